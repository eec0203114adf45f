package main

// A small HTTP/1.1 server: keep-alive, pipelining (answers in order), Content-Length
// bodies up to 1 MiB, "Expect: 100-continue"; a Transfer-Encoding body is refused with
// 411. Each connection has one goroutine that reads a request, answers it with one
// write and reads the next. It does what the quota calls need and no more, at about
// half the CPU per call of net/http's server (figures in docs/quotas.md).
//
// What a client may take (limits, from TOKENMETER_QUOTA_SERVER_*): a request head must
// arrive within the header timeout and its body within the body timeout (else 408 and
// the connection is closed); a kept-alive connection may wait for its next request for
// the idle timeout (then it is closed without a word); at most maxConns connections are
// served at once, the ones past that are answered 503 and closed. Only origin-form
// targets ("/path?query") are taken (else 400), and one Content-Length (two different
// ones: 400; a body that could be read two ways could smuggle a request).

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

const maxHead = 16 << 10

// limits: how long a client may take, and how many connections are served at once.
type limits struct {
	header, body, idle time.Duration
	maxConns           int64
}

// limitsOf: the limits the worker set (TOKENMETER_QUOTA_SERVER_*), defaults for zeros.
func limitsOf(cfg config) limits {
	or := func(seconds, fallback float64) time.Duration {
		if seconds <= 0 {
			seconds = fallback
		}
		return time.Duration(seconds * float64(time.Second))
	}
	l := limits{or(cfg.HeaderTimeoutS, 10), or(cfg.BodyTimeoutS, 30), or(cfg.IdleTimeoutS, 60), int64(cfg.MaxConnections)}
	if l.maxConns <= 0 {
		l.maxConns = 1024
	}
	return l
}

type request struct {
	method, target, path, query string
	body                        []byte
	// the headers anything here reads (lower-case names); the others are skipped
	contentLength, transferEncoding, expect, connection string
	forwarded, accept, contentType, acceptEncoding      string
	lengths                                             int // different Content-Length values seen
}

// keptHeaders: the headers a request keeps (lower-case names), and where.
var keptHeaders = []struct {
	name  string
	field func(*request) *string
}{
	{"content-length", func(r *request) *string { return &r.contentLength }},
	{"transfer-encoding", func(r *request) *string { return &r.transferEncoding }},
	{"expect", func(r *request) *string { return &r.expect }},
	{"connection", func(r *request) *string { return &r.connection }},
	{"x-tokenmeter-forwarded", func(r *request) *string { return &r.forwarded }},
	{"accept", func(r *request) *string { return &r.accept }},
	{"content-type", func(r *request) *string { return &r.contentType }},
	{"accept-encoding", func(r *request) *string { return &r.acceptEncoding }},
}

// keep stores a header line's value if the server reads that header.
func (r *request) keep(line []byte) {
	colon := bytes.IndexByte(line, ':')
	if colon <= 0 {
		return
	}
	for _, h := range keptHeaders {
		if len(h.name) == colon && strings.EqualFold(string(line[:colon]), h.name) {
			value, field := string(bytes.TrimSpace(line[colon+1:])), h.field(r)
			if field == &r.contentLength && (r.lengths == 0 || value != *field) {
				r.lengths++
			}
			*field = value
			return
		}
	}
}

var errHeadTooLarge = errors.New("request head too large")

// readHead reads the request line and the headers, up to the empty line.
func readHead(r *bufio.Reader) (*request, string, error) {
	var req *request
	version := ""
	size := 0
	for {
		line, err := r.ReadSlice('\n')
		size += len(line)
		if errors.Is(err, bufio.ErrBufferFull) || size > maxHead {
			return nil, "", errHeadTooLarge
		}
		if err != nil {
			return nil, "", err
		}
		line = bytes.TrimRight(line, "\r\n")
		switch {
		case len(line) == 0 && req == nil:
			continue // a stray CRLF between requests
		case len(line) == 0:
			return req, version, nil
		case req == nil:
			parts := strings.Split(string(line), " ")
			if len(parts) != 3 {
				return nil, "", errBadRequestLine
			}
			req = &request{method: parts[0], target: parts[1]}
			version = parts[2]
		default:
			req.keep(line)
		}
	}
}

var errBadRequestLine = errors.New("malformed request line")

func (srv *Server) serve(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return // the server is stopping
		}
		if err != nil { // out of file descriptors, say: wait, and go on accepting
			log.Printf("accept: %v", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if srv.open.Add(1) > srv.limits.maxConns {
			srv.open.Add(-1)
			srv.turnAway(conn)
			continue
		}
		go func() {
			defer srv.open.Add(-1)
			srv.serveConn(conn)
		}()
	}
}

// turnAway answers a connection past the cap 503 and closes it; past twice the cap
// (the 503s themselves wait for slow clients, a second at most) it only closes it.
func (srv *Server) turnAway(conn net.Conn) {
	if now, last := time.Now().Unix(), srv.warned.Load(); now-last >= 60 && srv.warned.CompareAndSwap(last, now) {
		log.Printf("%d connections open, the limit (TOKENMETER_QUOTA_SERVER_MAX_CONNECTIONS): new ones are answered 503", srv.limits.maxConns)
	}
	if srv.turning.Add(1) > srv.limits.maxConns {
		srv.turning.Add(-1)
		_ = conn.Close()
		return
	}
	go func() {
		defer srv.turning.Add(-1)
		r := errorReply(503, "too many connections to the quota server; retry")
		r.headers = [][2]string{{"Retry-After", "1"}}
		srv.send(conn, new([]byte), r, false)
		lingerClose(conn)
	}()
}

// timedOut: whether a read failed on its deadline (a limit), not on the client leaving.
func timedOut(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }

func (srv *Server) serveConn(conn net.Conn) {
	defer lingerClose(conn)
	lim := srv.limits
	r := bufio.NewReaderSize(conn, maxHead+1)
	out := make([]byte, 0, 1024)
	for first := true; ; first = false {
		if !first { // kept alive: the next request may take up to the idle timeout to begin
			_ = conn.SetReadDeadline(time.Now().Add(lim.idle))
			if _, err := r.Peek(1); err != nil {
				return
			}
		}
		_ = conn.SetReadDeadline(time.Now().Add(lim.header))
		req, version, err := readHead(r)
		if err != nil {
			switch {
			case errors.Is(err, errHeadTooLarge):
				srv.send(conn, &out, errorReply(431, "request head too large"), false)
			case errors.Is(err, errBadRequestLine):
				srv.send(conn, &out, errorReply(400, "malformed request line"), false)
			case timedOut(err):
				srv.send(conn, &out, errorReply(408, fmt.Sprintf("request head not received within %s", lim.header)), false)
			}
			return
		}
		if !strings.HasPrefix(version, "HTTP/1.") {
			srv.send(conn, &out, errorReply(505, "malformed request line"), false)
			return
		}
		if !originForm(req.target) {
			srv.send(conn, &out, errorReply(400, errBadTarget.Error()), false)
			return
		}
		if req.transferEncoding != "" {
			srv.send(conn, &out, errorReply(411, "send the body with Content-Length"), false)
			return
		}
		if req.lengths > 1 {
			srv.send(conn, &out, errorReply(400, "more than one Content-Length"), false)
			return
		}
		length := 0
		if text := req.contentLength; text != "" {
			n, err := strconv.Atoi(text)
			if err != nil || n < 0 || strings.TrimLeft(text, "0123456789") != "" {
				srv.send(conn, &out, errorReply(400, "bad Content-Length"), false)
				return
			}
			length = n
		}
		if length > maxBody {
			srv.send(conn, &out, errorReply(413, fmt.Sprintf("body larger than %d bytes", maxBody)), false)
			return
		}
		if length > 0 {
			if r.Buffered() < length {
				if strings.EqualFold(req.expect, "100-continue") {
					if !srv.write(conn, []byte("HTTP/1.1 100 Continue\r\n\r\n")) {
						return
					}
				}
				_ = conn.SetReadDeadline(time.Now().Add(lim.body))
			}
			if req.body, err = readBody(r, length); err != nil {
				if timedOut(err) {
					srv.send(conn, &out, errorReply(408, fmt.Sprintf("request body not received within %s", lim.body)), false)
				}
				return
			}
		}
		connection := strings.ToLower(req.connection)
		keep := connection != "close"
		if version != "HTTP/1.1" {
			keep = connection == "keep-alive"
		}
		req.path, req.query, _ = strings.Cut(req.target, "?")
		if !srv.send(conn, &out, srv.dispatch(req), keep) || !keep {
			return
		}
	}
}

// readBody reads length bytes of body into memory that grows as they arrive, doubling
// from 16 KiB (a client that announces 1 MiB and sends a few bytes holds 16 KiB, not
// the MiB).
func readBody(r *bufio.Reader, length int) ([]byte, error) {
	body := make([]byte, 0, min(length, 16<<10))
	for len(body) < length {
		if len(body) == cap(body) {
			body = slices.Grow(body, min(cap(body), length-len(body)))
		}
		n, err := r.Read(body[len(body):min(cap(body), length)])
		body = body[:len(body)+n]
		if err != nil && len(body) < length {
			return nil, err
		}
	}
	return body, nil
}

// lingerClose closes a connection so that the client reads the last answer: the
// server stops writing, then reads (and drops) what the client still sends, for up to a
// second, before closing; closing with unread data would reset the connection and the
// client could lose an answer it had not read yet (a 413 sent before the body, say).
func lingerClose(conn net.Conn) {
	if tcp, ok := conn.(*net.TCPConn); ok {
		_ = tcp.CloseWrite()
		_ = tcp.SetReadDeadline(time.Now().Add(time.Second))
		_, _ = io.CopyN(io.Discard, tcp, 2*maxBody)
	}
	_ = conn.Close()
}

// send writes one answer (one write); false when the client is gone.
func (srv *Server) send(conn net.Conn, buf *[]byte, r *reply, keep bool) bool {
	b := (*buf)[:0]
	reason := http.StatusText(r.status)
	if reason == "" {
		reason = "Status"
	}
	ctype := r.ctype
	if ctype == "" {
		ctype = contentJSON
	}
	b = append(b, "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(r.status), 10)
	b = append(b, ' ')
	b = append(b, reason...)
	b = append(b, "\r\nContent-Type: "...)
	b = append(b, ctype...)
	b = append(b, "\r\nContent-Length: "...)
	b = strconv.AppendInt(b, int64(len(r.body)), 10)
	b = append(b, "\r\n"...)
	for _, kv := range r.headers {
		b = append(b, kv[0]...)
		b = append(b, ": "...)
		b = append(b, kv[1]...)
		b = append(b, "\r\n"...)
	}
	if !keep {
		b = append(b, "Connection: close\r\n"...)
	}
	b = append(b, "\r\n"...)
	b = append(b, r.body...)
	*buf = b
	return srv.write(conn, b)
}

// write sends b, within the body timeout (a client that does not read its answers is
// cut off like one that does not send its body); false when it did not all go out.
func (srv *Server) write(conn net.Conn, b []byte) bool {
	_ = conn.SetWriteDeadline(time.Now().Add(srv.limits.body))
	_, err := conn.Write(b)
	return err == nil
}
