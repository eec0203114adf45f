package main

// A small HTTP/1.1 server: keep-alive, pipelining (answers in order), Content-Length
// bodies up to 1 MiB, "Expect: 100-continue"; a Transfer-Encoding body is refused with
// 411. Each connection has one goroutine that reads a request, answers it with one
// write and reads the next. It does what the quota calls need and no more, at about
// half the CPU per call of net/http's server (figures in docs/quotas.md).

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

const maxHead = 16 << 10

type request struct {
	method, target, path, query string
	body                        []byte
	// the headers anything here reads (lower-case names); the others are skipped
	contentLength, transferEncoding, expect, connection string
	forwarded, accept, contentType, acceptEncoding      string
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
			*h.field(r) = string(bytes.TrimSpace(line[colon+1:]))
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
		go srv.serveConn(conn)
	}
}

func (srv *Server) serveConn(conn net.Conn) {
	defer lingerClose(conn)
	r := bufio.NewReaderSize(conn, maxHead+1)
	out := make([]byte, 0, 1024)
	for {
		req, version, err := readHead(r)
		if err != nil {
			if errors.Is(err, errHeadTooLarge) {
				srv.send(conn, &out, errorReply(431, "request head too large"), false)
			} else if errors.Is(err, errBadRequestLine) {
				srv.send(conn, &out, errorReply(400, "malformed request line"), false)
			}
			return
		}
		if !strings.HasPrefix(version, "HTTP/1.") {
			srv.send(conn, &out, errorReply(505, "malformed request line"), false)
			return
		}
		if req.transferEncoding != "" {
			srv.send(conn, &out, errorReply(411, "send the body with Content-Length"), false)
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
			if r.Buffered() < length && strings.EqualFold(req.expect, "100-continue") {
				if _, err := conn.Write([]byte("HTTP/1.1 100 Continue\r\n\r\n")); err != nil {
					return
				}
			}
			req.body = make([]byte, length)
			if _, err := io.ReadFull(r, req.body); err != nil {
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
	_, err := conn.Write(b)
	return err == nil
}
