package main

// The reservation journal (pipeline/quota/journal.py has the format): every reserve,
// commit and release is one JSON line, written to the operating system before the
// answer goes out, so a killed worker (even SIGKILL) loses nothing; a host crash can
// lose the last writes (no fsync per call). At start the file is replayed, the holds
// that have not expired are kept, and the file is rewritten with just those.
//
//	{"o":"r","id":…,"t":tenant,"s":subscriber,"a":amount,"x":expires_ms}  reserve
//	{"o":"c","id":…,"a":committed,"e":event_id,"x":pending_expires_ms}    commit
//	{"o":"d","id":…}                                                       release

import (
	"bufio"
	"encoding/json"
	"errors"
	"log"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/shopspring/decimal"
)

const compactAfter = 200_000 // lines

type JournalHold struct {
	Key  QuotaKey
	Hold Hold
}

// Journal: lines are made under the service's lock (take hands a call its own), and
// written after it, in any order between calls: a call's lines are written before its
// answer goes out, and a reservation's next call comes after that answer, so each
// reservation's lines stay in order. fileMu keeps writes off a file being replaced.
type Journal struct {
	path   string
	fileMu sync.RWMutex
	file   *os.File
	lines  int
	buf    []byte
}

func openJournal(path string) (*Journal, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	return &Journal{path: path, file: f}, nil
}

type journalOp struct {
	O  string          `json:"o"`
	ID string          `json:"id"`
	T  string          `json:"t"`
	S  *string         `json:"s"`
	A  json.RawMessage `json:"a"`
	E  *string         `json:"e"`
	X  json.Number     `json:"x"`
}

func decimalOf(raw json.RawMessage) (decimal.Decimal, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return dec(string(raw))
	}
	return dec(s)
}

// replay returns the holds still live at now and rewrites the file with only those.
func (j *Journal) replay(now int64) ([]JournalHold, error) {
	holds := map[string]*JournalHold{}
	order := []string{}
	if f, err := os.Open(j.path); err == nil {
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 16<<20)
		number := 0
		for sc.Scan() {
			number++
			var op journalOp
			if err := json.Unmarshal(sc.Bytes(), &op); err != nil || op.ID == "" {
				// a torn last line (killed mid-write) is expected; one bad line must
				// not block the worker
				log.Printf("reservation journal line %d ignored", number)
				continue
			}
			if !j.apply(holds, &order, &op) {
				log.Printf("reservation journal line %d ignored", number)
			}
		}
		f.Close()
	} else if !os.IsNotExist(err) {
		return nil, err
	}
	live := []JournalHold{}
	for _, id := range order {
		if h := holds[id]; h != nil && h.Hold.ExpiresMS > now {
			live = append(live, *h)
			delete(holds, id) // an id reserved twice is kept once
		}
	}
	return live, j.rewrite(live)
}

func (j *Journal) apply(holds map[string]*JournalHold, order *[]string, op *journalOp) bool {
	switch op.O {
	case "r":
		amount, err := decimalOf(op.A)
		x, err2 := op.X.Int64()
		if err != nil || err2 != nil {
			return false
		}
		sub := ""
		if op.S != nil {
			sub = *op.S
		}
		holds[op.ID] = &JournalHold{QuotaKey{op.T, sub}, Hold{ID: op.ID, Amount: amount, ExpiresMS: x, Granted: amount}}
		*order = append(*order, op.ID)
	case "c":
		found := holds[op.ID]
		if found == nil {
			return true
		}
		amount, err := decimalOf(op.A)
		x, err2 := op.X.Int64()
		if err != nil || err2 != nil {
			return false
		}
		if amount.Sign() == 0 {
			delete(holds, op.ID)
			return true
		}
		found.Hold.Pending = true
		found.Hold.Amount = amount
		found.Hold.EventID = op.E
		found.Hold.ExpiresMS = x
	case "d":
		delete(holds, op.ID)
	default:
		return false
	}
	return true
}

func (j *Journal) rewrite(live []JournalHold) error {
	tmp := j.path + ".tmp"
	var data []byte
	for _, jh := range live {
		h := jh.Hold
		data = appendReserve(data, jh.Key, h.ID, h.Granted, h.ExpiresMS)
		if h.Pending {
			data = appendCommit(data, h.ID, h.Amount, h.EventID, h.ExpiresMS)
		}
	}
	j.fileMu.Lock()
	defer j.fileMu.Unlock()
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, j.path); err != nil {
		return err
	}
	if j.file != nil {
		j.file.Close()
		j.file = nil
	}
	f, err := os.OpenFile(j.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	j.file = f
	j.lines = len(live)
	return nil
}

func jsonString(b []byte, s string) []byte {
	q, _ := json.Marshal(s)
	return append(b, q...)
}

func appendReserve(b []byte, k QuotaKey, id string, amount decimal.Decimal, expires int64) []byte {
	b = append(b, `{"o":"r","id":"`...)
	b = append(b, id...)
	b = append(b, `","t":`...)
	b = jsonString(b, k.Tenant)
	b = append(b, `,"s":`...)
	b = jsonString(b, k.Subscriber)
	b = append(b, `,"a":"`...)
	b = append(b, fmtDec(amount)...)
	b = append(b, `","x":`...)
	b = strconv.AppendInt(b, expires, 10)
	return append(b, "}\n"...)
}

func appendCommit(b []byte, id string, amount decimal.Decimal, eventID *string, expires int64) []byte {
	b = append(b, `{"o":"c","id":"`...)
	b = append(b, id...)
	b = append(b, `","a":"`...)
	b = append(b, fmtDec(amount)...)
	b = appendOptional(append(b, `","e":`...), eventID)
	b = append(b, `,"x":`...)
	b = strconv.AppendInt(b, expires, 10)
	return append(b, "}\n"...)
}

func (j *Journal) reserved(k QuotaKey, id string, amount decimal.Decimal, expires int64) {
	j.buf = appendReserve(j.buf, k, id, amount, expires)
	j.lines++
}

func (j *Journal) committed(id string, amount decimal.Decimal, eventID *string, expires int64) {
	j.buf = appendCommit(j.buf, id, amount, eventID, expires)
	j.lines++
}

func (j *Journal) released(id string) {
	j.buf = append(j.buf, `{"o":"d","id":"`...)
	j.buf = append(j.buf, id...)
	j.buf = append(j.buf, "\"}\n"...)
	j.lines++
}

// take hands over the lines made since the last take (the service's lock is held):
// the call that made them writes them.
func (j *Journal) take() []byte {
	out := j.buf
	j.buf = nil
	return out
}

// write appends lines to the file (one write; without the service's lock).
func (j *Journal) write(lines []byte) error {
	j.fileMu.RLock()
	defer j.fileMu.RUnlock()
	if j.file == nil {
		return errors.New("the journal is closed")
	}
	_, err := j.file.Write(lines)
	return err
}

func (j *Journal) close() {
	j.fileMu.Lock()
	defer j.fileMu.Unlock()
	if j.file != nil {
		j.file.Close()
		j.file = nil
	}
}
