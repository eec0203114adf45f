// Command tokenmeter-quotad is the quota server: the worker's web port, in a process of
// its own (pipeline/quota/link.py spawns it; pipeline/quota/service.py is the worker's
// side).
//
// Why a process, and why Go: a reservation is on the critical path of every model call,
// while the worker's interpreter is busy with batches. Here the four quota calls run on
// their own, at a few microseconds of CPU each, so a 2-core machine that also runs the
// pipeline, the broker and the warehouse still answers them in milliseconds.
//
// What it owns: the reservations (ledgers, holds, the journal) and the listening socket
// on TOKENMETER_WEB_HOST:TOKENMETER_WEB_PORT. What it gets from the worker: every change
// of usage, definitions and partitions, in the order the worker made them, so its
// ledgers hold the same usage as the worker's; and which worker owns which usage
// partition, to route a call to the owner. What stays in the worker: reading Kafka and
// the warehouse, thresholds and alerts, webhooks, and its own pages, which this server
// forwards to it on 127.0.0.1.
//
// It stops when the worker does: at the end of the link, or by PR_SET_PDEATHSIG should
// the worker be killed.
package main

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

const statsInterval = 500 * time.Millisecond

type config struct {
	WebHost      string `json:"web_host"`
	WebPort      int    `json:"web_port"`
	Journal      string `json:"journal"`
	PseudonymKey string `json:"pseudonym_key"` // hex
	PendingTTLMS int64  `json:"pending_ttl_ms"`
	Nice         int    `json:"nice"`
	RTPrio       int    `json:"rtprio"`
	// the upper bounds (seconds) of the worker's histogram of call times
	DurationBuckets []float64 `json:"duration_buckets"`
	// what a client may take (TOKENMETER_QUOTA_SERVER_*; 0: the default, limits below)
	HeaderTimeoutS float64 `json:"header_timeout_s"`
	BodyTimeoutS   float64 `json:"body_timeout_s"`
	IdleTimeoutS   float64 `json:"idle_timeout_s"`
	MaxConnections int     `json:"max_connections"`
}

type Server struct {
	service   *Service
	link      *Link
	host      string
	port      int
	faust     route // the worker's own pages, on 127.0.0.1
	routes    map[int]route
	client    *http.Client
	outcomes  map[string]int
	durations map[string][]float64
	buckets   []float64
	limits    limits
	open      atomic.Int64 // connections being served
	turning   atomic.Int64 // connections being answered 503 (over the cap)
	warned    atomic.Int64 // when the cap was last logged (unix seconds)
}

func main() {
	linkFD := flag.Int("link-fd", -1, "the worker's end of the link (a Unix socket)")
	parentPID := flag.Int("parent-pid", 0, "the worker's pid")
	faustPort := flag.Int("faust-port", 0, "where the worker's own pages listen on 127.0.0.1")
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix(fmt.Sprintf("[quota server %d] ", os.Getpid()))
	if *linkFD < 0 || *faustPort <= 0 {
		fmt.Fprintln(os.Stderr, "tokenmeter-quotad is started by the tokenmeter worker (tokenmeter worker), not by hand")
		os.Exit(2)
	}
	dieWithParent(*parentPID)
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGPIPE) // the worker decides when to stop
	conn, err := net.FileConn(os.NewFile(uintptr(*linkFD), "link"))
	if err != nil {
		log.Fatalf("no link to the worker: %v", err)
	}
	link := &Link{conn: conn}
	os.Exit(run(link, *faustPort))
}

func run(link *Link, faustPort int) int {
	parts, err := link.read()
	if err != nil {
		return 1
	}
	var cfg config
	if len(parts) < 2 || string(parts[0]) != `"config"` || json.Unmarshal(parts[1], &cfg) != nil {
		_ = link.send("error", "the quota server expected its configuration first")
		return 1
	}
	key, err := hex.DecodeString(cfg.PseudonymKey)
	if err != nil || len(key) == 0 {
		_ = link.send("error", "the quota server got no pseudonym key")
		return 1
	}
	setPriority(cfg.Nice)
	if cfg.RTPrio > 0 {
		setRealtime(cfg.RTPrio)
	}

	// the live data is small (ledgers, holds, a minute of settled ids): collect less
	// often than the default, trading a few MB for CPU on every call
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}
	var journal *Journal
	if cfg.Journal != "" {
		if journal, err = openJournal(cfg.Journal); err != nil {
			_ = link.send("error", fmt.Sprintf("TOKENMETER_DATA_DIR: cannot write the reservation journal %s: %v", filepath.Dir(cfg.Journal), err))
			return 1
		}
	}
	srv := newServer(cfg, key, journal, faustPort)
	srv.link = link
	address := net.JoinHostPort(cfg.WebHost, strconv.Itoa(cfg.WebPort))
	listener, err := net.Listen("tcp", address)
	if err != nil {
		reason := err.Error()
		var op *net.OpError
		if errors.As(err, &op) && op.Err != nil {
			reason = op.Err.Error()
		}
		_ = link.send("error", fmt.Sprintf("TOKENMETER_WEB_PORT: cannot listen on %s:%d: %s", cfg.WebHost, cfg.WebPort, reason))
		return 1
	}
	if err := link.send("listening"); err != nil {
		return 1
	}
	go srv.serve(listener)
	done := make(chan struct{})
	go srv.statsLoop(done)
	go srv.sweepLoop(done)
	started := time.Now()
	// a CPU profile of the first minute, for `go tool pprof` (docs/quotas.md, "Figures")
	if path := os.Getenv("TOKENMETER_QUOTAD_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil && pprof.StartCPUProfile(f) == nil {
			var once sync.Once
			stop := func() { once.Do(func() { pprof.StopCPUProfile(); f.Close() }) }
			time.AfterFunc(time.Minute, stop)
			defer stop()
		}
	}
	code := srv.follow()
	close(done)
	_ = listener.Close()
	srv.service.mu.Lock()
	if journal != nil {
		journal.close()
	}
	srv.service.mu.Unlock()
	log.Printf("stopped after %.0f s", time.Since(started).Seconds())
	return code
}

// newServer: a server for cfg, not listening yet; its pages at 127.0.0.1:faustPort.
func newServer(cfg config, key []byte, journal *Journal, faustPort int) *Server {
	return &Server{
		service: newService(key, cfg.PendingTTLMS, journal),
		host:    cfg.WebHost,
		port:    cfg.WebPort,
		faust:   newRoute("http://127.0.0.1:" + strconv.Itoa(faustPort)),
		routes:  map[int]route{},
		client: &http.Client{Transport: &http.Transport{
			DisableCompression: true, MaxIdleConnsPerHost: 64, IdleConnTimeout: 90 * time.Second,
		}, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
		outcomes:  map[string]int{},
		durations: map[string][]float64{},
		buckets:   cfg.DurationBuckets,
		limits:    limitsOf(cfg),
	}
}

// follow applies the worker's messages until it closes the link (0), or stops the
// server on a message it cannot apply (70: a bug; the worker restarts both).
func (srv *Server) follow() int {
	for {
		parts, err := srv.link.read()
		if errors.Is(err, io.EOF) {
			return 0
		}
		var apply change
		if err == nil {
			apply, err = srv.decodeMessage(parts)
		}
		if err == nil {
			err = apply()
		}
		if err != nil {
			log.Printf("stopping: %v", err)
			return 70
		}
	}
}

func (srv *Server) statsLoop(done chan struct{}) {
	tick := time.NewTicker(statsInterval)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
		}
		s := srv.service
		s.mu.Lock()
		outcomes, durations := srv.outcomes, srv.durations
		srv.outcomes, srv.durations = map[string]int{}, map[string][]float64{}
		open := s.openReservations()
		s.mu.Unlock()
		_ = srv.link.send("stats", outcomes, durations, open)
	}
}

func (srv *Server) sweepLoop(done chan struct{}) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for ticks := 1; ; ticks++ {
		select {
		case <-done:
			return
		case <-tick.C:
		}
		srv.service.mu.Lock()
		srv.service.sweep(ticks%60 == 0)
		srv.service.mu.Unlock()
	}
}

// dieWithParent: SIGKILL this process when the worker (the thread that spawned it) ends.
func dieWithParent(parent int) {
	_, _, _ = syscall.RawSyscall(syscall.SYS_PRCTL, syscall.PR_SET_PDEATHSIG, uintptr(syscall.SIGKILL), 0)
	if parent != 0 && os.Getppid() != parent {
		os.Exit(0) // the worker is already gone
	}
}

// setRealtime puts every thread under SCHED_FIFO at prio (TOKENMETER_QUOTA_SERVER_RTPRIO).
// On two shared cores a normal-policy process waits tens of milliseconds for a core now
// and then, whatever its nice value; a real-time one runs when it is ready (the kernel
// still keeps 5 % of each second for the others).
func setRealtime(prio int) {
	param := struct{ priority int32 }{int32(prio)}
	const schedFIFO = 1
	err := eachThread(func(tid int) error {
		_, _, errno := syscall.RawSyscall(syscall.SYS_SCHED_SETSCHEDULER, uintptr(tid), schedFIFO, uintptr(unsafe.Pointer(&param)))
		if errno != 0 {
			return errno
		}
		return nil
	})
	if err != nil {
		log.Printf("TOKENMETER_QUOTA_SERVER_RTPRIO=%d not applied: %v", prio, err)
	}
}

// setPriority applies TOKENMETER_QUOTA_SERVER_NICE to every thread.
func setPriority(nice int) {
	current, err := syscall.Getpriority(syscall.PRIO_PROCESS, 0)
	if err == nil && 20-current == nice { // the raw syscall returns 20 - nice
		return
	}
	if err := eachThread(func(tid int) error { return syscall.Setpriority(syscall.PRIO_PROCESS, tid, nice) }); err != nil {
		log.Printf("TOKENMETER_QUOTA_SERVER_NICE=%d not applied: %v", nice, err)
	}
}

// eachThread calls f for every thread of this process, until one fails (Linux keeps
// priorities per thread; threads started later inherit them from their creator).
func eachThread(f func(tid int) error) error {
	tasks, _ := os.ReadDir("/proc/self/task")
	for _, t := range tasks {
		if tid, err := strconv.Atoi(t.Name()); err == nil {
			if err := f(tid); err != nil {
				return err
			}
		}
	}
	return nil
}
