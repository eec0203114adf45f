package main

// The link to the worker: a Unix socket pair, each message a 4-byte big-endian length
// and a JSON array whose first element names it (pipeline/quota/link.py writes and reads
// the other end; both are this code base). Amounts are decimal strings.
//
// Worker -> server: ["config", {...}] first, then the changes of the worker's quota
// service in the order it made them: ["partitions", n], ["definition", tenant,
// subscriber, definition|null], ["assigned", [p]], ["revoked", [p]], ["apply", singles, sums],
// ["install", parts, subscriber_keys, rows, landed_event_ids], ["started"], plus
// ["routes", {partition: url}] and ["ask", id, ["pending_ids"]].
// Server -> worker: ["listening"] or ["error", text] once at start, ["answer", id,
// value], and every half second ["stats", outcomes, durations, open_reservations].

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strconv"
	"sync"

	"github.com/shopspring/decimal"
)

type Link struct {
	conn net.Conn
	wmu  sync.Mutex
}

func (l *Link) send(message ...any) error {
	data, err := json.Marshal(message)
	if err != nil {
		return err
	}
	frame := make([]byte, 4+len(data))
	binary.BigEndian.PutUint32(frame, uint32(len(data)))
	copy(frame[4:], data)
	l.wmu.Lock()
	defer l.wmu.Unlock()
	_, err = l.conn.Write(frame)
	return err
}

// read returns the next message's parts; io.EOF when the worker closed the link.
func (l *Link) read() ([]json.RawMessage, error) {
	var head [4]byte
	if _, err := io.ReadFull(l.conn, head[:]); err != nil {
		return nil, io.EOF
	}
	data := make([]byte, binary.BigEndian.Uint32(head[:]))
	if _, err := io.ReadFull(l.conn, data); err != nil {
		return nil, io.EOF
	}
	var parts []json.RawMessage
	if err := json.Unmarshal(data, &parts); err != nil || len(parts) == 0 {
		return nil, fmt.Errorf("bad message on the link: %.80q", data)
	}
	return parts, nil
}

// ---- decoding the worker's messages --------------------------------------------------

func decode[T any](raw json.RawMessage) (T, error) {
	var v T
	err := json.Unmarshal(raw, &v)
	return v, err
}

func dec(s string) (decimal.Decimal, error) {
	d, err := decimal.NewFromString(s)
	return norm(d), err
}

type definitionJSON struct {
	Period     string   `json:"period"`
	LimitTU    string   `json:"limit_tu"`
	LimitCNY   *string  `json:"limit_cny"`
	Thresholds []string `json:"thresholds"`
	Hard       bool     `json:"hard"`
}

func (d definitionJSON) definition() (*Definition, error) {
	limit, err := dec(d.LimitTU)
	if err != nil {
		return nil, err
	}
	out := &Definition{Period: d.Period, LimitTU: limit, Hard: d.Hard}
	if d.LimitCNY != nil {
		cny, err := dec(*d.LimitCNY)
		if err != nil {
			return nil, err
		}
		out.LimitCNY = &cny
	}
	for _, t := range d.Thresholds {
		v, err := dec(t)
		if err != nil {
			return nil, err
		}
		out.Thresholds = append(out.Thresholds, v)
	}
	if d.Period != "day" && d.Period != "month" {
		return nil, fmt.Errorf("period %q", d.Period)
	}
	return out, nil
}

// singles: [tenant, subscriber, event_ms, tu, cny, event_id, partition], in chunks of
// settleChunk events, each summed per quota and day, here, off the lock (yielding
// between chunks: the calls run on the same threads).
func decodeSingles(raw json.RawMessage) (*usageBatch, error) {
	rows, err := decode[[][7]json.RawMessage](raw)
	if err != nil {
		return nil, err
	}
	type group struct {
		tenant, subscriber string
		partition          int
		day                string
	}
	out := &usageBatch{}
	for start := 0; start < len(rows); start += settleChunk {
		chunk := rows[start:min(start+settleChunk, len(rows))]
		index := map[group]int{}
		c := usageChunk{events: make([]eventRef, 0, len(chunk))}
		for _, r := range chunk {
			var it struct {
				tenant, subscriber, eventID string
				tu, cny                     decimal.Decimal
				eventMS                     int64
				partition                   int
			}
			if err := unmarshalAll(r[:], &it.tenant, &it.subscriber, &it.eventMS, &it.tu, &it.cny, &it.eventID, &it.partition); err != nil {
				return nil, err
			}
			g := group{it.tenant, it.subscriber, it.partition, periodKey(it.eventMS, "day")}
			if i, ok := index[g]; ok {
				c.sums[i].TU = c.sums[i].TU.Add(it.tu)
				c.sums[i].CNY = c.sums[i].CNY.Add(it.cny)
			} else {
				index[g] = len(c.sums)
				c.sums = append(c.sums, groupSum{g.tenant, g.subscriber, g.partition, g.day, it.tu, it.cny})
			}
			c.events = append(c.events, eventRef{it.tenant, it.subscriber, it.eventID})
		}
		out.chunks = append(out.chunks, c)
		runtime.Gosched()
	}
	return out, nil
}

// sums: [tenant, partition, day, tu, cny, [event_ids]]
func decodeSums(raw json.RawMessage) ([]daySum, error) {
	return decodeEach(raw, func(r []json.RawMessage) (a daySum, err error) {
		err = unmarshalAll(r, &a.Tenant, &a.Partition, &a.Day, &a.TU, &a.CNY, &a.EventIDs)
		return a, checkDay(a.Day, err)
	})
}

// rows: [tenant, subscriber, partition, day, tu, cny]
func decodeRows(raw json.RawMessage) ([]usageRow, error) {
	return decodeEach(raw, func(r []json.RawMessage) (u usageRow, err error) {
		err = unmarshalAll(r, &u.Tenant, &u.Subscriber, &u.Partition, &u.Day, &u.TU, &u.CNY)
		return u, checkDay(u.Day, err)
	})
}

// decodeEach decodes a JSON array of arrays, one value per inner array.
func decodeEach[T any](raw json.RawMessage, one func([]json.RawMessage) (T, error)) ([]T, error) {
	rows, err := decode[[][]json.RawMessage](raw)
	if err != nil {
		return nil, err
	}
	out := make([]T, 0, len(rows))
	for _, r := range rows {
		v, err := one(r)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

// checkDay: a day key is "YYYY-MM-DD" (its month is its first 7 characters).
func checkDay(day string, err error) error {
	if err == nil && len(day) != 10 {
		return fmt.Errorf("day %q", day)
	}
	return err
}

// unmarshalAll decodes raws into targets, in order; an amount (a decimal string) goes
// into a *decimal.Decimal with the exponent -6. Too few raws is an error.
func unmarshalAll(raws []json.RawMessage, targets ...any) error {
	if len(raws) < len(targets) {
		return fmt.Errorf("%d values, want %d", len(raws), len(targets))
	}
	for i, t := range targets {
		if amount, ok := t.(*decimal.Decimal); ok {
			text, err := decode[string](raws[i])
			if err == nil {
				*amount, err = dec(text)
			}
			if err != nil {
				return err
			}
			continue
		}
		if err := json.Unmarshal(raws[i], t); err != nil {
			return err
		}
	}
	return nil
}

var errUnknown = errors.New("unknown message")

// messageParts: how many parts each kind of message has, at least (kind included).
var messageParts = map[string]int{"apply": 3, "install": 5, "definition": 4, "assigned": 2,
	"revoked": 2, "partitions": 2, "routes": 2, "ask": 3}

// change is one decoded message of the worker, to apply (it takes the server's lock).
type change func() error

// locked: f under the server's lock.
func (srv *Server) locked(f change) change {
	return func() error {
		srv.service.mu.Lock()
		defer srv.service.mu.Unlock()
		return f()
	}
}

// decodeMessage decodes one message of the worker (without the server's lock: a batch's
// usage can take milliseconds to decode, and the calls go on meanwhile) into the change
// to apply.
func (srv *Server) decodeMessage(parts []json.RawMessage) (change, error) {
	var kind string
	if err := json.Unmarshal(parts[0], &kind); err != nil {
		return nil, err
	}
	s := srv.service
	if want := messageParts[kind]; len(parts) < want {
		return nil, fmt.Errorf("%s: %d parts, want %d", kind, len(parts), want)
	}
	switch kind {
	case "apply":
		singles, err := decodeSingles(parts[1])
		if err != nil {
			return nil, fmt.Errorf("apply: %w", err)
		}
		sums, err := decodeSums(parts[2])
		if err != nil {
			return nil, fmt.Errorf("apply: %w", err)
		}
		return func() error { s.apply(singles, sums); return nil }, nil // it locks itself
	case "install":
		ps, err := decode[[]int](parts[1])
		if err != nil {
			return nil, err
		}
		pairs, err := decode[[][2]string](parts[2])
		if err != nil {
			return nil, err
		}
		keys := make([]QuotaKey, len(pairs))
		for i, p := range pairs {
			keys[i] = QuotaKey{p[0], p[1]}
		}
		rows, err := decodeRows(parts[3])
		if err != nil {
			return nil, fmt.Errorf("install: %w", err)
		}
		landed, err := decode[[]string](parts[4])
		if err != nil {
			return nil, err
		}
		return srv.locked(func() error { s.install(ps, keys, rows, landed); return nil }), nil
	case "definition":
		var k QuotaKey
		var raw *definitionJSON
		if err := unmarshalAll(parts[1:], &k.Tenant, &k.Subscriber, &raw); err != nil {
			return nil, err
		}
		var d *Definition
		if raw != nil {
			var err error
			if d, err = raw.definition(); err != nil {
				return nil, fmt.Errorf("definition %s: %w", k, err)
			}
		}
		return srv.locked(func() error { s.setDefinition(k, d); return nil }), nil
	case "assigned", "revoked":
		ps, err := decode[[]int](parts[1])
		if err != nil {
			return nil, err
		}
		take := s.assign
		if kind == "revoked" {
			take = s.revoke
		}
		return srv.locked(func() error { take(ps); return nil }), nil
	case "partitions":
		n, err := decode[int](parts[1])
		if err != nil {
			return nil, err
		}
		return srv.locked(func() error { return s.setPartitions(n) }), nil
	case "started":
		return srv.locked(func() error { s.started = true; return nil }), nil
	case "routes":
		found, err := decode[map[string]string](parts[1])
		if err != nil {
			return nil, err
		}
		routes := map[int]route{}
		for p, url := range found {
			n, err := strconv.Atoi(p)
			if err != nil {
				return nil, err
			}
			routes[n] = newRoute(url)
		}
		return srv.locked(func() error { srv.routes = routes; return nil }), nil
	case "ask":
		question, err := decode[[]string](parts[2])
		if err != nil || len(question) == 0 || question[0] != "pending_ids" {
			return nil, fmt.Errorf("ask: unknown question %s", parts[2])
		}
		return func() error {
			s.mu.Lock()
			ids := s.pendingIDs()
			s.mu.Unlock()
			return srv.link.send("answer", parts[1], ids) // not under the lock: a socket write
		}, nil
	}
	return nil, fmt.Errorf("%w %q", errUnknown, kind)
}
