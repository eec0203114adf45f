package main

// The ledger of one quota: a port of pipeline/metering/quota.py (QuotaLedger), which
// documents the rules. Three amounts for the quota's current period: used (billable TU
// of stored usage events, from the worker), reserved (open reservations) and pending
// (committed reservations whose usage event is not stored yet). A hard quota grants
// min(n, limit - used - reserved - pending), never negative.

import (
	"container/heap"
	"fmt"

	"github.com/shopspring/decimal"
)

const settledMemoryMS = 60_000 // how long a settled id answers a retried commit/release

type QuotaKey struct {
	Tenant     string
	Subscriber string
}

func (k QuotaKey) String() string {
	if k.Subscriber != "" {
		return k.Tenant + "/" + k.Subscriber
	}
	return k.Tenant
}

type Definition struct {
	Period     string // day | month
	LimitTU    decimal.Decimal
	LimitCNY   *decimal.Decimal
	Thresholds []decimal.Decimal
	Hard       bool
}

func (d *Definition) periodAt(ms int64) string { return periodKey(ms, d.Period) }

type Usage struct{ TU, CNY decimal.Decimal }

type Hold struct {
	ID        string
	Amount    decimal.Decimal
	ExpiresMS int64
	Granted   decimal.Decimal
	Pending   bool
	EventID   *string
}

type Grant struct {
	ReservationID *string
	Requested     decimal.Decimal
	Granted       decimal.Decimal
	ExpiresMS     int64
	OverLimit     bool
}

type Settlement struct {
	ReservationID string
	Outcome       string // committed | released | expired
	Granted       decimal.Decimal
	Committed     decimal.Decimal
	Released      decimal.Decimal
	OverGrant     bool
	EventID       *string
	AtMS          int64
}

type Status struct {
	Key              QuotaKey
	Definition       *Definition
	Period           string
	Used             Usage
	Reserved         decimal.Decimal
	Pending          decimal.Decimal
	Remaining        decimal.Decimal
	State            string
	Crossed          []decimal.Decimal
	OpenReservations int
}

// ---- errors: what the client is told, and the HTTP status of it ----------------------

type errKind int

const (
	errBadRequest errKind = iota // 400
	errNoQuota                   // 404
	errNotFound                  // 404
	errNotReady                  // 503
	errSettled                   // 409
	errRefused                   // 409
)

type QuotaError struct {
	Kind       errKind
	Msg        string
	Settlement *Settlement
}

func (e *QuotaError) Error() string { return e.Msg }

func (e *QuotaError) status() int {
	switch e.Kind {
	case errBadRequest:
		return 400
	case errNoQuota, errNotFound:
		return 404
	case errNotReady:
		return 503
	}
	return 409
}

func badRequest(format string, args ...any) *QuotaError {
	return &QuotaError{Kind: errBadRequest, Msg: fmt.Sprintf(format, args...)}
}

// ---- the expiry heap: (when, what) ---------------------------------------------------

const (
	expHold    = 0 // a hold's TTL
	expSettled = 1 // forget a settled id
	expLanded  = 2 // forget a landed event id
)

type expiry struct {
	when int64
	kind int8
	id   string
}

type expiryHeap []expiry

func (h expiryHeap) Len() int           { return len(h) }
func (h expiryHeap) Less(i, j int) bool { return h[i].when < h[j].when }
func (h expiryHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *expiryHeap) Push(x any)        { *h = append(*h, x.(expiry)) }
func (h *expiryHeap) Pop() any {
	old := *h
	n := len(old)
	x := old[n-1]
	*h = old[:n-1]
	return x
}

// ---- the ledger ------------------------------------------------------------------------

type Ledger struct {
	Key          QuotaKey
	Definition   *Definition
	PendingTTLMS int64
	Usage        map[string]*Usage
	Holds        map[string]*Hold
	Partition    int
	reserved     decimal.Decimal
	pending      decimal.Decimal
	byEvent      map[string]string
	landed       map[string]int64
	settled      map[string]*Settlement
	expiry       expiryHeap
}

func newLedger(key QuotaKey, d *Definition, pendingTTLMS int64, partition int) *Ledger {
	return &Ledger{
		Key: key, Definition: d, PendingTTLMS: pendingTTLMS, Partition: partition,
		Usage: map[string]*Usage{}, Holds: map[string]*Hold{},
		byEvent: map[string]string{}, landed: map[string]int64{}, settled: map[string]*Settlement{},
	}
}

func (l *Ledger) held() decimal.Decimal { return l.reserved.Add(l.pending) }

func (l *Ledger) definition() (*Definition, error) {
	if l.Definition == nil {
		return nil, &QuotaError{Kind: errNoQuota, Msg: "no quota defined for " + l.Key.String()}
	}
	return l.Definition, nil
}

func (l *Ledger) used(now int64) Usage {
	if found := l.Usage[l.Definition.periodAt(now)]; found != nil {
		return *found
	}
	return Usage{zero, zero}
}

func (l *Ledger) cnyOut(d *Definition, u Usage) bool {
	return d.LimitCNY != nil && u.CNY.Cmp(*d.LimitCNY) >= 0
}

// available is what a hard quota could grant now (never negative).
func (l *Ledger) available(now int64) decimal.Decimal {
	d := l.Definition
	l.expire(now)
	u := l.used(now)
	if l.cnyOut(d, u) {
		return zero
	}
	return maxDec(zero, d.LimitTU.Sub(u.TU).Sub(l.held()))
}

func (l *Ledger) push(e expiry) { heap.Push(&l.expiry, e) }

// reserve grants up to n TU for ttlMS: hard, min(n, available); soft, all of it, with
// OverLimit when it goes past the limit. id must be new.
func (l *Ledger) reserve(id string, n decimal.Decimal, ttlMS, now int64) (Grant, error) {
	d, err := l.definition()
	if err != nil {
		return Grant{}, err
	}
	if n.Sign() < 0 {
		return Grant{}, badRequest("token_units: must be >= 0")
	}
	l.expire(now)
	_, held := l.Holds[id]
	if _, settled := l.settled[id]; held || settled {
		return Grant{}, &QuotaError{Kind: errRefused, Msg: "reservation id " + id + " already used"}
	}
	expires := now + ttlMS
	var granted decimal.Decimal
	over := false
	if d.Hard {
		granted = minDec(n, l.available(now))
	} else {
		granted = n
		u := l.used(now)
		over = u.TU.Add(l.held()).Add(n).Cmp(d.LimitTU) > 0 || l.cnyOut(d, u)
	}
	if granted.Sign() <= 0 {
		return Grant{nil, n, zero, expires, over}, nil
	}
	l.Holds[id] = &Hold{ID: id, Amount: granted, ExpiresMS: expires, Granted: granted}
	l.reserved = l.reserved.Add(granted)
	l.push(expiry{expires, expHold, id})
	rid := id
	return Grant{&rid, n, granted, expires, over}, nil
}

func (l *Ledger) settledOf(id string) *Settlement {
	if s := l.settled[id]; s != nil {
		return s
	}
	return l.committedFromHold(id)
}

func (l *Ledger) takeOpen(id string, now int64) (*Hold, error) {
	l.expire(now)
	if h := l.Holds[id]; h != nil && !h.Pending {
		return h, nil
	}
	if s := l.settledOf(id); s != nil {
		return nil, &QuotaError{Kind: errSettled, Msg: fmt.Sprintf("reservation %s is already %s", id, s.Outcome), Settlement: s}
	}
	return nil, &QuotaError{Kind: errNotFound, Msg: fmt.Sprintf("no open reservation %s (unknown or expired)", id)}
}

// commit settles an open reservation with what the call used; the rest is released.
// The committed amount stays held (pending) until the usage event is stored or
// PendingTTLMS passes. The same commit again returns the same settlement.
func (l *Ledger) commit(id string, usedTU decimal.Decimal, now int64, eventID *string) (*Settlement, error) {
	if usedTU.Sign() < 0 {
		return nil, badRequest("token_units: must be >= 0")
	}
	if s := l.settledOf(id); s != nil {
		if s.Outcome == "committed" && s.Committed.Equal(usedTU) {
			return s, nil
		}
		msg := fmt.Sprintf("reservation %s is already %s", id, s.Outcome)
		if s.Outcome == "committed" {
			msg += fmt.Sprintf(" (%s TU)", fmtDec(s.Committed))
		}
		return nil, &QuotaError{Kind: errSettled, Msg: msg, Settlement: s}
	}
	h, err := l.takeOpen(id, now)
	if err != nil {
		return nil, err
	}
	l.reserved = l.reserved.Sub(h.Amount)
	out := &Settlement{
		ReservationID: id, Outcome: "committed", Granted: h.Granted, Committed: usedTU,
		Released: maxDec(zero, h.Granted.Sub(usedTU)), OverGrant: usedTU.Cmp(h.Granted) > 0,
		EventID: eventID, AtMS: now,
	}
	l.remember(out, now)
	landed := false
	if eventID != nil {
		_, landed = l.landed[*eventID]
	}
	if usedTU.Sign() == 0 || landed {
		delete(l.Holds, id)
		if landed {
			delete(l.landed, *eventID)
		}
		return out, nil
	}
	h.Pending = true
	h.Amount = usedTU
	h.EventID = eventID
	h.ExpiresMS = now + l.PendingTTLMS
	l.pending = l.pending.Add(usedTU)
	if eventID != nil {
		l.byEvent[*eventID] = id
	}
	l.push(expiry{h.ExpiresMS, expHold, id})
	return out, nil
}

// committedFromHold: a pending hold restored from the journal stands for its commit.
func (l *Ledger) committedFromHold(id string) *Settlement {
	h := l.Holds[id]
	if h == nil || !h.Pending {
		return nil
	}
	return &Settlement{
		ReservationID: id, Outcome: "committed", Granted: h.Granted, Committed: h.Amount,
		Released: maxDec(zero, h.Granted.Sub(h.Amount)), OverGrant: h.Amount.Cmp(h.Granted) > 0,
		EventID: h.EventID,
	}
}

// release gives an open reservation back. Releasing twice returns the same answer.
func (l *Ledger) release(id string, now int64) (*Settlement, error) {
	if s := l.settled[id]; s != nil && s.Outcome == "released" {
		return s, nil
	}
	h, err := l.takeOpen(id, now)
	if err != nil {
		return nil, err
	}
	delete(l.Holds, id)
	l.reserved = l.reserved.Sub(h.Amount)
	out := &Settlement{ReservationID: id, Outcome: "released", Granted: h.Granted, Committed: zero, Released: h.Granted, AtMS: now}
	l.remember(out, now)
	return out, nil
}

func (l *Ledger) remember(s *Settlement, now int64) {
	l.settled[s.ReservationID] = s
	l.push(expiry{now + settledMemoryMS, expSettled, s.ReservationID})
}

// expire releases open reservations past their TTL and drops pending holds past the
// pending TTL.
func (l *Ledger) expire(now int64) {
	for len(l.expiry) > 0 && l.expiry[0].when <= now {
		e := heap.Pop(&l.expiry).(expiry)
		switch e.kind {
		case expSettled:
			if s := l.settled[e.id]; s != nil && s.AtMS+settledMemoryMS <= e.when {
				delete(l.settled, e.id)
			}
			continue
		case expLanded:
			delete(l.landed, e.id)
			continue
		}
		h := l.Holds[e.id]
		if h == nil || h.ExpiresMS != e.when {
			continue // settled meanwhile, or re-armed by a commit
		}
		delete(l.Holds, e.id)
		if h.Pending {
			l.pending = l.pending.Sub(h.Amount)
			if h.EventID != nil {
				delete(l.byEvent, *h.EventID)
			}
		} else {
			l.reserved = l.reserved.Sub(h.Amount)
			l.remember(&Settlement{ReservationID: e.id, Outcome: "expired", Granted: h.Granted, Committed: zero, Released: h.Granted, AtMS: now}, now)
		}
	}
}

// ---- usage from the worker ------------------------------------------------------------

// addUsage adds tu and cny to a period's usage in m.
func addUsage(m map[string]*Usage, period string, tu, cny decimal.Decimal) {
	if b := m[period]; b != nil {
		b.TU = b.TU.Add(tu)
		b.CNY = b.CNY.Add(cny)
	} else {
		m[period] = &Usage{tu, cny}
	}
}

// addDay counts usage of a Beijing day ("2026-11-28") in that day and its month.
func (l *Ledger) addDay(day string, tu, cny decimal.Decimal) {
	addUsage(l.Usage, day, tu, cny)
	addUsage(l.Usage, day[:7], tu, cny)
}

// dropPending drops the pending hold committed for a stored event; false if none.
func (l *Ledger) dropPending(eventID string) bool {
	id, ok := l.byEvent[eventID]
	if !ok {
		return false
	}
	delete(l.byEvent, eventID)
	if h := l.Holds[id]; h != nil {
		delete(l.Holds, id)
		l.pending = l.pending.Sub(h.Amount)
	}
	return true
}

// settleEvent: a usage event was stored (its usage counted): drop the pending hold
// committed for it, or, while reservations are open, remember it for a while, so that
// a commit sent after the event does not hold the amount again.
func (l *Ledger) settleEvent(eventID string, now int64) {
	if !l.dropPending(eventID) && l.reserved.Sign() > 0 {
		l.landed[eventID] = now
		l.push(expiry{now + settledMemoryMS, expLanded, eventID})
	}
}

// settleLanded drops pending holds whose events are already stored.
func (l *Ledger) settleLanded(eventIDs []string) {
	for _, e := range eventIDs {
		l.dropPending(e)
	}
}

func (l *Ledger) idle() bool {
	return l.Definition == nil && len(l.Holds) == 0 && len(l.Usage) == 0
}

// restoreHold re-opens a hold from the journal (expired ones are ignored).
func (l *Ledger) restoreHold(h Hold, now int64) {
	if h.ExpiresMS <= now {
		return
	}
	if _, ok := l.Holds[h.ID]; ok {
		return
	}
	l.Holds[h.ID] = &h
	if h.Pending {
		l.pending = l.pending.Add(h.Amount)
		if h.EventID != nil {
			l.byEvent[*h.EventID] = h.ID
		}
	} else {
		l.reserved = l.reserved.Add(h.Amount)
	}
	l.push(expiry{h.ExpiresMS, expHold, h.ID})
}

// prune forgets usage of periods before the previous one.
func (l *Ledger) prune(now int64) {
	keepDay := periodKey(now-dayMS, "day")
	keepMonth := previousMonth(periodKey(now, "month"))
	for k := range l.Usage {
		floor := keepMonth
		if len(k) == 10 {
			floor = keepDay
		}
		if k < floor {
			delete(l.Usage, k)
		}
	}
}

func (l *Ledger) ratioReached(d *Definition, u Usage, threshold decimal.Decimal) bool {
	hundred := decimal.NewFromInt(100)
	if u.TU.Mul(hundred).Cmp(threshold.Mul(d.LimitTU)) >= 0 {
		return true
	}
	return d.LimitCNY != nil && u.CNY.Mul(hundred).Cmp(threshold.Mul(*d.LimitCNY)) >= 0
}

func (l *Ledger) openCount() int {
	n := 0
	for _, h := range l.Holds {
		if !h.Pending {
			n++
		}
	}
	return n
}

// status: the current period's figures and state.
func (l *Ledger) status(now int64) (Status, error) {
	d, err := l.definition()
	if err != nil {
		return Status{}, err
	}
	l.expire(now)
	u := l.used(now)
	var remaining decimal.Decimal
	if d.Hard {
		remaining = l.available(now)
	} else {
		remaining = maxDec(zero, d.LimitTU.Sub(u.TU).Sub(l.held()))
	}
	crossed := []decimal.Decimal{}
	for _, t := range d.Thresholds {
		if l.ratioReached(d, u, t) {
			crossed = append(crossed, t)
		}
	}
	state := "ok"
	if u.TU.Cmp(d.LimitTU) >= 0 || l.cnyOut(d, u) || remaining.Sign() <= 0 {
		state = "exhausted"
	} else if len(crossed) > 0 {
		state = "warning"
	}
	return Status{l.Key, d, d.periodAt(now), u, l.reserved, l.pending, remaining, state, crossed, l.openCount()}, nil
}
