// Command quotaload is the load generator of tests/perf/bench_quota.py: reserve+commit
// pairs against the quota service, open loop, over a fixed set of keep-alive HTTP/1.1
// connections.
//
// Pair i is due at start + i/rate. It starts then on an idle connection, or waits in a
// FIFO for one. A pair is POST /v1/quotas/{tenant}/reservations (201, with a
// reservation_id), then POST /v1/reservations/{rid}/commit with the event id
// b{run}-{i} (200); tenants are used round robin. Latencies count from the due time,
// so a slow server is never hidden by a slow client (no coordinated omission). First a
// warm-up of 400 pairs at min(rate, 500)/s, whose figures are dropped, then
// rate*duration pairs at rate.
//
// For each completed pair (warm-up included) one line "tenant\tevent_id\n" goes to
// stdout, written every 20 ms or 50 lines (without blocking when stdout is a pipe), so
// that the caller produces the usage event. The summary (JSON) goes to the file given
// by -out (to stdout, and the event lines nowhere, without it). With -wait-stdin the
// process then closes stdout and stays until stdin is closed, so that the caller can
// read its CPU time.
//
// The machine it runs on is shared with the server it measures, so it is built to cost
// little CPU: one goroutine runs an epoll loop over non-blocking sockets with raw
// system calls (read, write, and epoll_pwait2, whose timeout is in nanoseconds, so a
// pair starts on time rather than at the next millisecond), speaks just enough
// HTTP/1.1 for this API (Content-Length answers) and allocates nothing per pair; most
// of what it costs is the kernel's TCP work. Measured against a stub server at 2,000
// pairs/s on 2 cores, in percent of one core: net/http 41, net.Conn with a goroutine
// per connection 31 (every system call through the runtime wakes its monitor thread,
// sysmon, and every readiness goes through the scheduler), this loop 14-20 (11-13
// if pairs started on a 1 ms grid instead, which adds 0.4 ms to the median latency),
// the asyncio client of bench_quota.py 24-27. -procs sets GOMAXPROCS: 1 (the default)
// as the loop is a single goroutine; a second P would only add idle spinning of the
// scheduler and let the runtime's threads take the second core from the server.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

const (
	warmupPairs  = 400
	stallTimeout = 60 * time.Second
	maxWait      = time.Second
	flushEvery   = 20 * time.Millisecond
	flushLines   = 50
	reserveBody  = `{"token_units": 1000, "ttl_s": 30}`
	// epoll_pwait2 (Linux 5.11) has the same number on every architecture; the frozen
	// syscall package does not name it.
	sysEpollPwait2 = 441
)

var clockBase = time.Now()

// now is the monotonic time since the start of the process.
func now() time.Duration { return time.Since(clockBase) }

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

// phase is one open-loop run: n pairs at rate, figures indexed by the pair's number.
type phase struct {
	n        int
	rate     float64
	start    time.Duration
	record   bool
	finished int // completed or failed
	first    int // the event id number of pair 0
	done     []bool
	lag      []float64 // due -> reserve sent
	reserve  []float64 // due -> reserve answered
	service  []float64 // reserve sent -> answered
	commit   []float64 // commit sent -> answered
	pair     []float64 // due -> commit answered
}

// newPhase: n pairs at rate; their event ids are numbered from first (the warm-up's
// and the measured phase's never meet, so no event is a duplicate of another).
func newPhase(n int, rate float64, record bool, first int) *phase {
	p := &phase{n: n, rate: rate, record: record, first: first}
	if record {
		p.done = make([]bool, n)
		p.lag = make([]float64, n)
		p.reserve = make([]float64, n)
		p.service = make([]float64, n)
		p.commit = make([]float64, n)
		p.pair = make([]float64, n)
	}
	return p
}

func (p *phase) due(i int) time.Duration {
	return p.start + time.Duration(float64(i)/p.rate*1e9)
}

const (
	idle = iota
	reserving
	committing
)

// conn is one keep-alive connection running one pair at a time.
type conn struct {
	fd       int // -1: closed, connect again for the next pair
	step     int
	p        *phase
	i        int
	sent     time.Duration
	reserved time.Duration
	buf      []byte // buf[:n] read, buf[:used] of it the last answer
	n        int
	used     int
	out      []byte // the part of a request the socket did not take yet
	commit   []byte
}

type load struct {
	addr     syscall.Sockaddr
	family   int
	ep       int
	events   []syscall.EpollEvent
	pwait2   bool
	run      string
	tenants  []string
	reserve  [][]byte // the reserve request of each tenant
	conns    []*conn
	byFd     map[int]*conn
	idle     []*conn
	waiting  []int // due pairs of the current phase waiting for a connection (FIFO)
	head     int
	p        *phase
	errs     map[string]int
	progress time.Duration
	sink     sink
}

func (l *load) failed(why string) {
	if len(why) > 80 {
		why = why[:80]
	}
	l.errs[why]++
}

// ---- sockets and epoll ------------------------------------------------------------

func (l *load) connect(c *conn) error {
	fd, err := syscall.Socket(l.family, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	if err = syscall.Connect(fd, l.addr); err == nil {
		err = syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	}
	if err == nil {
		err = syscall.SetNonblock(fd, true)
	}
	if err == nil {
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(fd)}
		err = syscall.EpollCtl(l.ep, syscall.EPOLL_CTL_ADD, fd, &ev)
	}
	if err != nil {
		syscall.Close(fd)
		return err
	}
	c.fd, c.n, c.used, c.out = fd, 0, 0, c.out[:0]
	l.byFd[fd] = c
	return nil
}

func (l *load) closeConn(c *conn) {
	if c.fd >= 0 {
		delete(l.byFd, c.fd)
		syscall.Close(c.fd) // also leaves the epoll set
		c.fd = -1
	}
}

// wait blocks in epoll for at most d (0: poll); it returns the ready events. A raw
// system call: the runtime takes the goroutine as running, so it neither hands the P
// over nor wakes sysmon; when it needs the goroutine (GC, or sysmon's preemption after
// 10 ms) its signal ends the wait with EINTR.
func (l *load) wait(d time.Duration) []syscall.EpollEvent {
	d = max(d, 0)
	var k uintptr
	var errno syscall.Errno
	if l.pwait2 {
		ts := syscall.NsecToTimespec(int64(d))
		k, _, errno = syscall.RawSyscall6(sysEpollPwait2, uintptr(l.ep),
			uintptr(unsafe.Pointer(&l.events[0])), uintptr(len(l.events)),
			uintptr(unsafe.Pointer(&ts)), 0, 0)
		if errno == syscall.ENOSYS {
			l.pwait2 = false
		}
	}
	if !l.pwait2 {
		k, _, errno = syscall.RawSyscall6(syscall.SYS_EPOLL_PWAIT, uintptr(l.ep),
			uintptr(unsafe.Pointer(&l.events[0])), uintptr(len(l.events)),
			uintptr((d+time.Millisecond-1)/time.Millisecond), 0, 0)
	}
	if errno != 0 { // EINTR: a signal of the runtime (preemption, GC)
		return nil
	}
	return l.events[:k]
}

// rawWrite writes what the fd takes now (the system call without the runtime's
// bookkeeping: the fd is non-blocking).
func rawWrite(fd int, b []byte) (int, syscall.Errno) { return rawIO(syscall.SYS_WRITE, fd, b) }

func rawRead(fd int, b []byte) (int, syscall.Errno) { return rawIO(syscall.SYS_READ, fd, b) }

// rawIO: a read or write system call on b, retried when a signal interrupts it.
func rawIO(trap uintptr, fd int, b []byte) (int, syscall.Errno) {
	for {
		n, _, errno := syscall.RawSyscall(trap, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
		if errno != syscall.EINTR {
			return int(n), errno
		}
	}
}

// send writes a request; what the socket does not take is written when it is
// writable again (never, in practice: the requests are small).
func (l *load) send(c *conn, req []byte) bool {
	n, errno := rawWrite(c.fd, req)
	if errno == syscall.EAGAIN {
		n, errno = 0, 0
	}
	if errno != 0 {
		l.lost(c, errno.Error())
		return false
	}
	if n < len(req) {
		c.out = append(c.out[:0], req[n:]...)
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLOUT, Fd: int32(c.fd)}
		if err := syscall.EpollCtl(l.ep, syscall.EPOLL_CTL_MOD, c.fd, &ev); err != nil {
			l.lost(c, err.Error())
			return false
		}
	}
	return true
}

func (l *load) writable(c *conn) {
	n, errno := rawWrite(c.fd, c.out)
	if errno == syscall.EAGAIN {
		return
	}
	if errno != 0 {
		l.lost(c, errno.Error())
		return
	}
	c.out = c.out[:copy(c.out, c.out[n:])]
	if len(c.out) == 0 {
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(c.fd)}
		if err := syscall.EpollCtl(l.ep, syscall.EPOLL_CTL_MOD, c.fd, &ev); err != nil {
			l.lost(c, err.Error())
		}
	}
}

// ---- pairs ------------------------------------------------------------------------

// submit hands pair i of the current phase to an idle connection, or queues it.
func (l *load) submit(i int) {
	if len(l.idle) > 0 {
		c := l.idle[len(l.idle)-1]
		l.idle = l.idle[:len(l.idle)-1]
		l.start(c, i)
	} else {
		l.waiting = append(l.waiting, i)
	}
}

func (l *load) start(c *conn, i int) {
	c.p, c.i, c.step = l.p, i, reserving
	if c.fd < 0 {
		if err := l.connect(c); err != nil {
			l.fail(c, "connect: "+err.Error())
			return
		}
	}
	c.sent = now()
	l.send(c, l.reserve[i%len(l.reserve)])
}

// next ends the connection's pair and gives it the next waiting one, if any.
func (l *load) next(c *conn) {
	c.step = idle
	c.p.finished++
	l.progress = now()
	if l.head < len(l.waiting) {
		i := l.waiting[l.head]
		l.head++
		if l.head == len(l.waiting) {
			l.waiting, l.head = l.waiting[:0], 0
		}
		l.start(c, i)
		return
	}
	l.idle = append(l.idle, c)
}

func (l *load) fail(c *conn, why string) {
	l.failed(why)
	if c.step != idle {
		l.next(c)
	}
}

func (l *load) lost(c *conn, why string) {
	l.closeConn(c)
	l.fail(c, "connection lost: "+why)
}

func (l *load) readable(c *conn) {
	if c.used > 0 { // bytes beyond the last answer (none, without pipelining)
		c.n = copy(c.buf, c.buf[c.used:c.n])
		c.used = 0
	}
	if c.n == len(c.buf) {
		c.buf = append(c.buf, make([]byte, len(c.buf))...)
	}
	k, errno := rawRead(c.fd, c.buf[c.n:])
	if errno == syscall.EAGAIN {
		return
	}
	if errno != 0 || k == 0 {
		why := "EOF"
		if errno != 0 {
			why = errno.Error()
		}
		l.lost(c, why)
		return
	}
	c.n += k
	for c.fd >= 0 {
		status, body, complete, bad := c.answer()
		if bad != "" {
			l.lost(c, bad)
		}
		if !complete {
			return
		}
		l.answered(c, status, body)
	}
}

// answer takes the next complete answer from the buffer (bad: one it cannot read).
func (c *conn) answer() (status int, body []byte, complete bool, bad string) {
	data := c.buf[c.used:c.n]
	end := bytes.Index(data, []byte("\r\n\r\n"))
	if end < 0 {
		return 0, nil, false, ""
	}
	size, found := contentLength(data[:end])
	if !found {
		return 0, nil, false, "answer without Content-Length"
	}
	total := end + 4 + size
	if len(data) < total {
		if c.used+total > len(c.buf) { // room for a large body
			c.buf = append(c.buf, make([]byte, c.used+total-len(c.buf))...)
		}
		return 0, nil, false, ""
	}
	if end >= 12 && bytes.HasPrefix(data, []byte("HTTP/1.")) {
		status, _ = strconv.Atoi(string(data[9:12]))
	}
	c.used += total
	return status, data[end+4 : total], true, ""
}

func (l *load) answered(c *conn, status int, body []byte) {
	t := now()
	switch c.step {
	case reserving:
		if status != 201 {
			l.fail(c, httpError("reserve", status, body))
			return
		}
		rid, ok := reservationID(body)
		if !ok {
			l.fail(c, httpError("reserve: no reservation_id", status, body))
			return
		}
		c.reserved, c.step = t, committing
		l.send(c, l.commitRequest(c, rid))
	case committing:
		if status != 200 {
			l.fail(c, httpError("commit", status, body))
			return
		}
		if p := c.p; p.record {
			due := p.due(c.i)
			p.lag[c.i] = ms(c.sent - due)
			p.reserve[c.i] = ms(c.reserved - due)
			p.service[c.i] = ms(c.reserved - c.sent)
			p.commit[c.i] = ms(t - c.reserved)
			p.pair[c.i] = ms(t - due)
			p.done[c.i] = true
		}
		l.sink.add(l.tenants[c.i%len(l.tenants)], l.run, c.p.first+c.i)
		l.next(c)
	default:
		l.lost(c, httpError("answer without a request", status, body))
	}
}

// commitRequest builds the commit in the connection's own buffer.
func (l *load) commitRequest(c *conn, rid []byte) []byte {
	b := append(c.commit[:0], "POST /v1/reservations/"...)
	b = append(b, rid...)
	b = append(b, "/commit HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"+
		"Content-Length: "...)
	number := c.p.first + c.i
	size := len(`{"token_units": 800, "event_id": "b-"}`) + len(l.run) + len(strconv.Itoa(number))
	b = strconv.AppendInt(b, int64(size), 10)
	b = append(b, "\r\n\r\n"+`{"token_units": 800, "event_id": "b`...)
	b = append(b, l.run...)
	b = append(b, '-')
	b = strconv.AppendInt(b, int64(number), 10)
	b = append(b, `"}`...)
	c.commit = b
	return b
}

// contentLength finds Content-Length in an answer's head (any case).
func contentLength(head []byte) (int, bool) {
	const name = "\r\ncontent-length:"
	for i := bytes.IndexByte(head, '\r'); i >= 0 && i+len(name) <= len(head); {
		if bytes.EqualFold(head[i:i+len(name)], []byte(name)) {
			j := i + len(name)
			for j < len(head) && head[j] == ' ' {
				j++
			}
			k := j
			for k < len(head) && head[k] >= '0' && head[k] <= '9' {
				k++
			}
			size, err := strconv.Atoi(string(head[j:k]))
			return size, err == nil
		}
		next := bytes.IndexByte(head[i+1:], '\r')
		if next < 0 {
			break
		}
		i += 1 + next
	}
	return 0, false
}

func reservationID(body []byte) ([]byte, bool) {
	key := []byte(`"reservation_id":"`)
	at := bytes.Index(body, key)
	if at < 0 {
		return nil, false
	}
	at += len(key)
	end := bytes.IndexByte(body[at:], '"')
	if end < 0 {
		return nil, false
	}
	return body[at : at+end], true
}

func httpError(call string, status int, body []byte) string {
	if len(body) > 80 {
		body = body[:80]
	}
	return fmt.Sprintf("%s: HTTP %d %q", call, status, body)
}

// drive runs a phase: submits its pairs at their due times, serves the connections
// until every pair has finished, and returns the time from the first due time.
func (l *load) drive(p *phase) time.Duration {
	l.p = p
	p.start = now() + 50*time.Millisecond
	l.progress = now()
	next := 0
	for p.finished < p.n {
		t := now()
		for next < p.n && p.due(next) <= t {
			l.submit(next)
			next++
		}
		l.sink.flush(t, false)
		wait := maxWait
		if next < p.n {
			wait = min(wait, p.due(next)-t)
		}
		if l.sink.lines > 0 {
			wait = min(wait, l.sink.since+flushEvery-t)
		}
		if p.finished == p.n {
			break
		}
		for _, ev := range l.wait(wait) {
			c := l.byFd[int(ev.Fd)]
			if c == nil {
				continue
			}
			if ev.Events&syscall.EPOLLOUT != 0 && len(c.out) > 0 {
				l.writable(c)
			}
			if c.fd >= 0 && ev.Events&(syscall.EPOLLIN|syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
				l.readable(c)
			}
		}
		if now()-l.progress > stallTimeout {
			fmt.Fprintf(os.Stderr, "quotaload: no pair finished for %v\n", stallTimeout)
			os.Exit(1)
		}
	}
	return now() - p.start
}

// ---- event lines ------------------------------------------------------------------

// sink collects the "tenant\tevent_id\n" lines for stdout.
type sink struct {
	fd    int // -1: nowhere
	buf   []byte
	lines int
	since time.Duration // when the oldest unwritten line came
}

func (s *sink) add(tenant, run string, i int) {
	if s.fd < 0 {
		return
	}
	if s.lines == 0 {
		s.since = now()
	}
	s.buf = append(s.buf, tenant...)
	s.buf = append(s.buf, "\tb"...)
	s.buf = append(s.buf, run...)
	s.buf = append(s.buf, '-')
	s.buf = strconv.AppendInt(s.buf, int64(i), 10)
	s.buf = append(s.buf, '\n')
	s.lines++
}

// flush writes the lines when 50 are waiting or the oldest has waited 20 ms (all,
// waiting for the pipe, when final); a full pipe keeps them for later.
func (s *sink) flush(t time.Duration, final bool) {
	if s.lines == 0 && len(s.buf) == 0 || !final && s.lines < flushLines && t-s.since < flushEvery {
		return
	}
	for len(s.buf) > 0 {
		n, errno := rawWrite(s.fd, s.buf)
		if errno == syscall.EAGAIN && !final {
			break
		}
		if errno == syscall.EAGAIN {
			time.Sleep(time.Millisecond)
			continue
		}
		if errno != 0 {
			fmt.Fprintf(os.Stderr, "quotaload: writing the events: %v\n", errno)
			os.Exit(1)
		}
		s.buf = s.buf[:copy(s.buf, s.buf[n:])]
	}
	s.lines = 0
	if len(s.buf) > 0 { // the rest goes at the next flush
		s.lines, s.since = 1, t
	}
}

// ---- summary ----------------------------------------------------------------------

type figures struct {
	P50 *float64 `json:"p50"` // null when there is no value (NaN in bench_quota.py)
	P99 *float64 `json:"p99"`
	Max float64  `json:"max"`
}

type summary struct {
	OfferedPerS      float64        `json:"offered_per_s"`
	Reservations     int            `json:"reservations"`
	AchievedPerS     float64        `json:"achieved_per_s"`
	HTTPRequestsPerS float64        `json:"http_requests_per_s"`
	Errors           map[string]int `json:"errors"`
	ReserveMs        figures        `json:"reserve_ms"`
	ReserveServiceMs figures        `json:"reserve_service_ms"`
	CommitMs         figures        `json:"commit_ms"`
	ReserveCommitMs  figures        `json:"reserve_commit_ms"`
	StartLagMs       figures        `json:"start_lag_ms"`
}

func round(x float64, places int) float64 {
	f := math.Pow(10, float64(places))
	return math.Round(x*f) / f
}

// pct is bench_quota.py's pct(): the value at index int(n * p / 100) of the sorted
// values, or none.
func pct(sorted []float64, p float64) *float64 {
	if len(sorted) == 0 {
		return nil
	}
	v := round(sorted[min(len(sorted)-1, int(float64(len(sorted))*p/100))], 3)
	return &v
}

func summarise(p *phase, values []float64) figures {
	var got []float64
	for i, ok := range p.done {
		if ok {
			got = append(got, values[i])
		}
	}
	slices.Sort(got)
	f := figures{P50: pct(got, 50), P99: pct(got, 99)}
	if len(got) > 0 {
		f.Max = round(got[len(got)-1], 3)
	}
	return f
}

func fatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "quotaload: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	base := flag.String("url", "http://127.0.0.1:8080", "the quota service")
	rate := flag.Float64("rate", 2000, "pairs per second")
	duration := flag.Float64("duration", 20, "seconds")
	connections := flag.Int("connections", 32, "keep-alive connections")
	tenantList := flag.String("tenants", "", "tenants, comma-separated, used round robin")
	run := flag.String("run", "run", "event ids are b{run}-{i}")
	out := flag.String("out", "", "write the summary (JSON) here; without it, to stdout")
	procs := flag.Int("procs", 1, "GOMAXPROCS")
	waitStdin := flag.Bool("wait-stdin", false, "at the end, close stdout and wait for stdin's end")
	flag.Parse()
	runtime.GOMAXPROCS(*procs)
	if *tenantList == "" || *rate <= 0 || *connections <= 0 {
		fatal("need -tenants, a positive -rate and -connections")
	}
	u, err := url.Parse(*base)
	if err != nil || u.Scheme != "http" || u.Host == "" {
		fatal("bad -url %q (http://host:port)", *base)
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), "80")
	}
	ta, err := net.ResolveTCPAddr("tcp", host)
	if err != nil {
		fatal("%v", err)
	}
	l := &load{
		run:     *run,
		tenants: strings.Split(*tenantList, ","),
		byFd:    map[int]*conn{},
		errs:    map[string]int{},
		events:  make([]syscall.EpollEvent, *connections+1),
		pwait2:  true,
		sink:    sink{fd: -1, buf: make([]byte, 0, 64<<10)},
	}
	if ip4 := ta.IP.To4(); ip4 != nil {
		l.family, l.addr = syscall.AF_INET, &syscall.SockaddrInet4{Port: ta.Port, Addr: [4]byte(ip4)}
	} else {
		l.family, l.addr = syscall.AF_INET6, &syscall.SockaddrInet6{Port: ta.Port, Addr: [16]byte(ta.IP.To16())}
	}
	for _, t := range l.tenants {
		l.reserve = append(l.reserve, fmt.Appendf(nil, "POST /v1/quotas/%s/reservations HTTP/1.1\r\n"+
			"Host: bench\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
			t, len(reserveBody), reserveBody))
	}
	if *out != "" {
		l.sink.fd = 1
		var st syscall.Stat_t
		if syscall.Fstat(1, &st) == nil && st.Mode&syscall.S_IFMT == syscall.S_IFIFO {
			syscall.SetNonblock(1, true) // our end of the pipe only (else: blocking writes)
		}
	}
	if l.ep, err = syscall.EpollCreate1(syscall.EPOLL_CLOEXEC); err != nil {
		fatal("epoll: %v", err)
	}
	for range *connections {
		c := &conn{fd: -1, buf: make([]byte, 4096)}
		if err := l.connect(c); err != nil {
			fatal("connect to %s: %v", host, err)
		}
		l.conns = append(l.conns, c)
		l.idle = append(l.idle, c)
	}

	l.drive(newPhase(warmupPairs, min(*rate, 500), false, 0)) // connections, caches, batches
	p := newPhase(int(*rate**duration), *rate, true, warmupPairs)
	elapsed := l.drive(p).Seconds()
	for _, c := range l.conns {
		l.closeConn(c)
	}
	if l.sink.fd >= 0 {
		l.sink.flush(now(), true)
	}

	done := 0
	for _, ok := range p.done {
		if ok {
			done++
		}
	}
	s := summary{
		OfferedPerS:      *rate,
		Reservations:     done,
		AchievedPerS:     round(float64(done)/elapsed, 1),
		HTTPRequestsPerS: round(2*float64(done)/elapsed, 1),
		Errors:           l.errs,
		ReserveMs:        summarise(p, p.reserve),
		ReserveServiceMs: summarise(p, p.service),
		CommitMs:         summarise(p, p.commit),
		ReserveCommitMs:  summarise(p, p.pair),
		StartLagMs:       summarise(p, p.lag),
	}
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		fatal("%v", err)
	}
	data = append(data, '\n')
	if *out == "" {
		os.Stdout.Write(data)
		return
	}
	if err := os.WriteFile(*out, data, 0o644); err != nil {
		fatal("%v", err)
	}
	if *waitStdin {
		syscall.Close(1)
		io.Copy(io.Discard, os.Stdin)
	}
}
