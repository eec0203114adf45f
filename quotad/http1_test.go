package main

// The HTTP server against hostile clients (issue 14): request targets that would make
// it a proxy to other hosts, amounts whose text costs more than any call may, two
// Content-Lengths, and clients that are slow or too many. Each test talks to a real
// listener over TCP, as a client on the network would.

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// startServer serves cfg on a free port of 127.0.0.1 (the worker's pages at faustPort);
// it answers quota calls 503 (starting), which is all these tests need of the service.
func startServer(t *testing.T, cfg config, faustPort int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := newServer(cfg, []byte(strings.Repeat("k", 32)), nil, faustPort)
	go srv.serve(ln)
	t.Cleanup(func() { _ = ln.Close() })
	return ln.Addr().String()
}

// exchange sends raw bytes on a new connection and reads one answer.
func exchange(t *testing.T, addr, raw string) (*http.Response, string) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatal(err)
	}
	return readAnswer(t, bufio.NewReader(conn))
}

func readAnswer(t *testing.T, r *bufio.Reader) (*http.Response, string) {
	t.Helper()
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

// accepting: a listener on another port that counts the connections it gets.
func accepting(t *testing.T) (port int, seen *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	seen = &atomic.Int64{}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			seen.Add(1)
			_ = conn.Close()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port, seen
}

func TestOnlyPathsAreForwardedAndOnlyToTheWorkersPages(t *testing.T) {
	var mu sync.Mutex
	var paths []string
	pages := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		paths = append(paths, r.Host+" "+r.RequestURI)
		_, _ = io.WriteString(w, "pages")
	}))
	defer pages.Close()
	faustPort := pages.Listener.Addr().(*net.TCPAddr).Port
	victim, seen := accepting(t)
	addr := startServer(t, config{}, faustPort)
	other := fmt.Sprintf("127.0.0.1:%d", victim)
	body := "Content-Length: 11\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"evil\":1}\n"
	for _, line := range []string{
		"PUT @" + other + "/admin/delete HTTP/1.1", // the reproduction
		"PUT http://" + other + "/admin/delete HTTP/1.1",
		"CONNECT " + other + " HTTP/1.1",
		"OPTIONS * HTTP/1.1",
		"GET " + other + "/x HTTP/1.1",
		"GET /a\x01b HTTP/1.1",
		"GET /a#@" + other + " HTTP/1.1",
		"GET /%zz HTTP/1.1",
	} {
		resp, text := exchange(t, addr, line+"\r\n"+body)
		if resp.StatusCode != 400 || !strings.Contains(text, "origin-form") {
			t.Errorf("%q: %d %s, want 400 naming the origin-form", line, resp.StatusCode, text)
		}
	}
	// a path that looks like an authority is still a path, on the worker's own pages
	resp, text := exchange(t, addr, "GET //"+other+"/x?y=@"+other+" HTTP/1.1\r\n"+body)
	if resp.StatusCode != 200 || text != "pages" {
		t.Errorf("//host path: %d %s", resp.StatusCode, text)
	}
	want := fmt.Sprintf("127.0.0.1:%d //%s/x?y=@%s", faustPort, other, other)
	mu.Lock()
	defer mu.Unlock()
	if len(paths) != 1 || paths[0] != want {
		t.Errorf("the worker's pages saw %q, want [%q]", paths, want)
	}
	time.Sleep(200 * time.Millisecond) // a connection on its way would have arrived
	if n := seen.Load(); n != 0 {
		t.Fatalf("the listener on port %d got %d connections", victim, n)
	}
}

func TestOneContentLengthOnly(t *testing.T) {
	addr := startServer(t, config{}, 1)
	resp, text := exchange(t, addr, "POST /v1/quotas/t/reservations HTTP/1.1\r\n"+
		"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}POST /v1/quotas/t/reservations HTTP/1.1\r\n\r\n")
	if resp.StatusCode != 400 || !strings.Contains(text, "more than one Content-Length") {
		t.Fatalf("two Content-Lengths: %d %s", resp.StatusCode, text)
	}
	// the same length twice is one length (RFC 9112, 6.3)
	resp, text = exchange(t, addr, "POST /v1/quotas/t/reservations HTTP/1.1\r\n"+
		"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}")
	if resp.StatusCode != 400 || !strings.Contains(text, "token_units: required") {
		t.Fatalf("the same Content-Length twice: %d %s", resp.StatusCode, text)
	}
}

// within: f's result, or a failure when it takes longer than limit (the unbounded
// parse took minutes: the test must fail, not hang).
func within[T any](t *testing.T, limit time.Duration, what string, f func() T) T {
	t.Helper()
	done := make(chan T, 1)
	go func() { done <- f() }()
	select {
	case v := <-done:
		return v
	case <-time.After(limit):
		t.Fatalf("%s: still running after %s", what, limit)
		panic("unreachable")
	}
}

func TestAmountsAreBoundedBeforeArithmetic(t *testing.T) {
	for raw, words := range map[string]string{
		`1e999999999`:                              "token_units: the exponent must be within -30..30",
		`1e30000000`:                               "token_units: the exponent must be within -30..30",
		`"1e-10000000"`:                            "token_units: the exponent must be within -30..30",
		`1E+0000000000000000000000031`:             "token_units: the exponent must be within -30..30",
		`0.5e99999999999999999999999`:              "token_units: the exponent must be within -30..30",
		`1` + strings.Repeat("0", 5000):            "token_units: too long a number (at most 40 digits)",
		`"0.` + strings.Repeat("0", 100000) + `1"`: "token_units: too long a number",
		`-1e999999999`:                             "the exponent must be within",
		`1e31`:                                     "the exponent must be within",
		`1e19`:                                     "token_units: must be <= 1e18",
		`-1`:                                       "token_units: must be >= 0",
		`"NaN"`:                                    "token_units: must be finite",
		`true`:                                     "token_units: must be a number",
		`[1]`:                                      "token_units: must be a number",
		`1.0000001`:                                "token_units: at most 6 decimal places",
		`"1e-7"`:                                   "token_units: at most 6 decimal places",
		`"1e+-5"`:                                  "token_units: must be a number, got '1e+-5'",
		`"12abc"`:                                  "token_units: must be a number, got '12abc'",
		`"1e` + strings.Repeat("0", 100000) + `5x"`: "token_units: must be a number, got '1e000",
	} {
		err := within(t, 5*time.Second, raw[:min(len(raw), 30)], func() error {
			_, err := toTU([]byte(raw), "token_units")
			return err
		})
		if err == nil || !strings.Contains(err.Error(), words) || err.(*QuotaError).status() != 400 {
			t.Errorf("toTU(%.40s) = %v, want a 400 with %q", raw, err, words)
		} else if len(err.Error()) > 160 {
			t.Errorf("toTU(%.40s): an answer of %d bytes", raw, len(err.Error()))
		}
	}
	for raw, want := range map[string]string{
		`1e18`: "1000000000000000000", `"1e-6"`: "0.000001", `0.000001e6`: "1",
		`1.0000000`: "1", `"1E+3"`: "1000", `1e-30`: "", `"0e30"`: "0",
		`"0.` + strings.Repeat("0", 37) + `"`: "0", `123456.123456`: "123456.123456",
	} {
		got, err := toTU([]byte(raw), "token_units")
		if want == "" {
			if err == nil {
				t.Errorf("toTU(%s) = %s, want an error", raw, got)
			}
			continue
		}
		if err != nil || fmtDec(got) != want || got.Exponent() != -6 {
			t.Errorf("toTU(%s) = %s (exponent %d), %v; want %s", raw, got, got.Exponent(), err, want)
		}
	}
}

func TestSlowClientsAreCutAndTooManyTurnedAway(t *testing.T) {
	cfg := config{HeaderTimeoutS: 0.3, BodyTimeoutS: 0.3, IdleTimeoutS: 0.3, MaxConnections: 3}
	addr := startServer(t, cfg, 1)
	dial := func(raw string) (net.Conn, *bufio.Reader) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		_, _ = io.WriteString(conn, raw)
		return conn, bufio.NewReader(conn)
	}
	// a head that never ends, a body that never ends: 408, and the connection closed
	headConn, slowHead := dial("GET /v1/quo")
	bodyConn, slowBody := dial("POST /v1/quotas/t/reservations HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{\"tok")
	time.Sleep(100 * time.Millisecond) // both are being served before the third comes
	// a kept-alive connection answered, then idle: closed without a word
	idleConn, idle := dial("GET /v1/quotas/t HTTP/1.1\r\n\r\n")
	if resp, _ := readAnswer(t, idle); resp.StatusCode != 503 {
		t.Fatalf("a quota call while starting: %d", resp.StatusCode)
	}
	// the three connections are the cap: the fourth is answered 503 at once
	started := time.Now()
	_, over := dial("GET /v1/quotas/t HTTP/1.1\r\n\r\n")
	resp, text := readAnswer(t, over)
	if resp.StatusCode != 503 || resp.Header.Get("Retry-After") != "1" || !strings.Contains(text, "too many connections") {
		t.Fatalf("over the cap: %d %s", resp.StatusCode, text)
	}
	if time.Since(started) > 250*time.Millisecond {
		t.Errorf("the 503 waited for the slow clients (%s)", time.Since(started))
	}
	for what, r := range map[string]*bufio.Reader{"head": slowHead, "body": slowBody} {
		resp, text := readAnswer(t, r)
		if resp.StatusCode != 408 || !strings.Contains(text, "request "+what+" not received within 300ms") {
			t.Errorf("slow %s: %d %s", what, resp.StatusCode, text)
		}
		if rest, err := io.ReadAll(r); err != nil || len(rest) != 0 {
			t.Errorf("slow %s: the connection stays open (%q, %v)", what, rest, err)
		}
	}
	if rest, err := io.ReadAll(idle); err != nil || len(rest) != 0 {
		t.Errorf("idle: not closed quietly (%q, %v)", rest, err)
	}
	// the slow ones gone (the server waits up to a second for a client to close, so
	// that it reads its last answer), a new connection is served again
	for _, c := range []net.Conn{headConn, bodyConn, idleConn} {
		_ = c.Close()
	}
	time.Sleep(100 * time.Millisecond)
	_, again := dial("GET /v1/quotas/t HTTP/1.1\r\n\r\n")
	if resp, text := readAnswer(t, again); !strings.Contains(text, "starting") {
		t.Fatalf("after the slow clients: %d %s", resp.StatusCode, text)
	}
}

func TestLimitsDefaultWhenUnset(t *testing.T) {
	got := limitsOf(config{})
	want := limits{10 * time.Second, 30 * time.Second, 60 * time.Second, 1024}
	if got != want {
		t.Fatalf("limitsOf(config{}) = %+v, want %+v", got, want)
	}
	got = limitsOf(config{HeaderTimeoutS: 1.5, BodyTimeoutS: 2, IdleTimeoutS: 3, MaxConnections: 7})
	if want := (limits{1500 * time.Millisecond, 2 * time.Second, 3 * time.Second, 7}); got != want {
		t.Fatalf("limitsOf = %+v, want %+v", got, want)
	}
}

func TestBodiesArriveWholeInAnyPieces(t *testing.T) {
	for _, length := range []int{1, 16 << 10, 16<<10 + 1, 100_000, maxBody} {
		want := make([]byte, length)
		for i := range want {
			want[i] = byte(i * 7)
		}
		client, server := net.Pipe()
		go func() {
			for rest := want; len(rest) > 0; {
				n := min(len(rest), 1+len(rest)%7919) // uneven pieces
				_, _ = client.Write(rest[:n])
				rest = rest[n:]
			}
			_, _ = client.Write([]byte("next request"))
			_ = client.Close()
		}()
		r := bufio.NewReaderSize(server, maxHead+1)
		got, err := readBody(r, length)
		if err != nil || string(got) != string(want) {
			t.Fatalf("readBody(%d): %d bytes, %v", length, len(got), err)
		}
		if rest, _ := io.ReadAll(r); string(rest) != "next request" {
			t.Fatalf("readBody(%d) took more than its body: %q follows", length, rest)
		}
	}
	// a body cut short is an error, not a short body
	client, server := net.Pipe()
	go func() { _, _ = client.Write([]byte("12345")); _ = client.Close() }()
	if got, err := readBody(bufio.NewReader(server), 10); err == nil {
		t.Fatalf("readBody of 5 bytes out of 10 = %q", got)
	}
}
