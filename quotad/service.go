package main

// The quota server's state: definitions and ledgers of the tenants whose usage
// partitions the worker owns, kept in step with the worker's (pipeline/quota/service.py)
// by the changes it sends over the link, plus the reservations and their journal, which
// live only here. Every call and every change runs under one lock, each to completion
// before the next: "never past the limit" holds without anything finer.

import (
	"fmt"
	"log"
	"runtime"
	"sync"
	"time"

	"github.com/shopspring/decimal"
)

const maxTTLS = 3600

type Service struct {
	mu           sync.Mutex
	pseudonymKey []byte
	pendingTTLMS int64
	journal      *Journal
	replayed     bool
	partitions   int
	ledgers      map[QuotaKey]*Ledger
	definitions  map[QuotaKey]*Definition
	readyParts   map[int]bool
	assigned     map[int]bool
	syncedSubs   map[QuotaKey]bool
	partCache    map[string]int
	started      bool
	clock        func() int64
}

func newService(key []byte, pendingTTLMS int64, journal *Journal) *Service {
	return &Service{
		pseudonymKey: key, pendingTTLMS: pendingTTLMS, journal: journal,
		ledgers: map[QuotaKey]*Ledger{}, definitions: map[QuotaKey]*Definition{},
		readyParts: map[int]bool{}, assigned: map[int]bool{}, syncedSubs: map[QuotaKey]bool{},
		partCache: map[string]int{},
		clock:     func() int64 { return time.Now().UnixMilli() },
	}
}

func (s *Service) quotaKey(tenant, subscriber string) QuotaKey {
	if subscriber != "" {
		return QuotaKey{tenant, pseudonymise(subscriber, s.pseudonymKey)}
	}
	return QuotaKey{Tenant: tenant}
}

func (s *Service) partitionOf(tenant string) int {
	if p, ok := s.partCache[tenant]; ok {
		return p
	}
	p := partitionOf(tenant, s.partitions)
	if len(s.partCache) < 1_000_000 {
		s.partCache[tenant] = p
	}
	return p
}

// owns: whether the worker has restored (and so this server serves) the tenant.
func (s *Service) owns(tenant string) bool { return s.readyParts[s.partitionOf(tenant)] }

func (s *Service) ledger(k QuotaKey) *Ledger { return s.ledgerIn(k, s.partitionOf(k.Tenant)) }

// ledgerIn: the ledger of k, made (in partition) if there is none yet.
func (s *Service) ledgerIn(k QuotaKey, partition int) *Ledger {
	l := s.ledgers[k]
	if l == nil {
		l = newLedger(k, s.definitions[k], s.pendingTTLMS, partition)
		s.ledgers[k] = l
	}
	return l
}

func notReady(format string, args ...any) *QuotaError {
	return &QuotaError{Kind: errNotReady, Msg: fmt.Sprintf(format, args...)}
}

// ledgersFor: the ledgers a request on k acts on, the subscriber's (if any) and the
// tenant's.
func (s *Service) ledgersFor(k QuotaKey) ([]*Ledger, error) {
	if !s.started {
		return nil, notReady("the quota service is starting; retry shortly")
	}
	if _, ok := s.definitions[k]; !ok {
		who := "tenant"
		if k.Subscriber != "" {
			who = "subscriber " + k.Subscriber + " of tenant"
		}
		return nil, &QuotaError{Kind: errNoQuota, Msg: fmt.Sprintf("no quota defined for %s %s", who, k.Tenant)}
	}
	if !s.owns(k.Tenant) {
		return nil, notReady("usage of tenant %s is not loaded on this worker yet; retry shortly", k.Tenant)
	}
	if k.Subscriber != "" && !s.syncedSubs[k] {
		return nil, notReady("usage of %s is being loaded; retry shortly", k)
	}
	out := []*Ledger{s.ledger(k)}
	tenant := QuotaKey{Tenant: k.Tenant}
	if _, ok := s.definitions[tenant]; k.Subscriber != "" && ok {
		out = append(out, s.ledger(tenant))
	}
	return out, nil
}

// ---- the four calls (callers hold s.mu) ------------------------------------------------

func (s *Service) get(tenant, subscriber string) (Status, error) {
	ls, err := s.ledgersFor(s.quotaKey(tenant, subscriber))
	if err != nil {
		return Status{}, err
	}
	return ls[0].status(s.clock())
}

func (s *Service) reserve(tenant string, n decimal.Decimal, ttlS float64, subscriber string) (Grant, error) {
	if !(ttlS > 0 && ttlS <= maxTTLS) {
		return Grant{}, badRequest("ttl_s: must be in (0, %d]", maxTTLS)
	}
	k := s.quotaKey(tenant, subscriber)
	ls, err := s.ledgersFor(k)
	if err != nil {
		return Grant{}, err
	}
	now := s.clock()
	granted := n
	for _, l := range ls {
		if l.Definition != nil && l.Definition.Hard {
			granted = minDec(granted, l.available(now))
		}
	}
	id := reservationID(k)
	ttlMS := int64(ttlS * 1000)
	var first Grant
	over := false
	for i, l := range ls {
		g, err := l.reserve(id, granted, ttlMS, now)
		if err != nil {
			return Grant{}, err
		}
		if i == 0 {
			first = g
		}
		over = over || g.OverLimit
	}
	out := Grant{first.ReservationID, n, first.Granted, first.ExpiresMS, over}
	if out.ReservationID != nil && s.journal != nil {
		s.journal.reserved(k, id, out.Granted, out.ExpiresMS)
	}
	return out, nil
}

func (s *Service) ledgersForReservation(k QuotaKey, id string) ([]*Ledger, error) {
	ls, err := s.ledgersFor(k)
	if qe, ok := err.(*QuotaError); ok && qe.Kind == errNoQuota {
		// the definition was deleted while the reservation was open: settle it anyway
		l := s.ledgers[k]
		if l != nil {
			if _, held := l.Holds[id]; held {
				return []*Ledger{l}, nil
			}
			if _, done := l.settled[id]; done {
				return []*Ledger{l}, nil
			}
		}
		return nil, &QuotaError{Kind: errNotFound, Msg: "no open reservation " + id}
	}
	return ls, err
}

func (s *Service) commit(id string, n decimal.Decimal, eventID *string) (*Settlement, error) {
	return s.settle(id, func(l *Ledger, now int64) (*Settlement, error) {
		return l.commit(id, n, now, eventID)
	}, func(now int64) { s.journal.committed(id, n, eventID, now+s.pendingTTLMS) })
}

func (s *Service) release(id string) (*Settlement, error) {
	return s.settle(id, func(l *Ledger, now int64) (*Settlement, error) {
		return l.release(id, now)
	}, func(int64) { s.journal.released(id) })
}

// settle ends reservation id in its ledgers (the subscriber's, then the tenant's) with
// end, and journals it with record unless the answer is a repeated one.
func (s *Service) settle(
	id string, end func(*Ledger, int64) (*Settlement, error), record func(now int64),
) (*Settlement, error) {
	k, err := parseReservationID(id)
	if err != nil {
		return nil, err
	}
	ls, err := s.ledgersForReservation(k, id)
	if err != nil {
		return nil, err
	}
	now := s.clock()
	out, err := end(ls[0], now)
	if err != nil {
		return nil, err
	}
	for _, other := range ls[1:] {
		_, _ = end(other, now)
	}
	if out.AtMS == now && s.journal != nil { // not a repeated answer
		record(now)
	}
	return out, nil
}

// ---- the worker's changes (callers hold s.mu, but for apply) ----------------------------

// usageBatch: the stored events of tenants with a quota, as the worker sent them
// (decoded without the lock), in chunks of up to settleChunk events: each chunk's usage
// summed per quota and Beijing day, and its event ids in order, to settle the holds
// committed for them.
type usageBatch struct{ chunks []usageChunk }

type usageChunk struct {
	sums   []groupSum
	events []eventRef
}

type groupSum struct {
	Tenant, Subscriber string
	Partition          int
	Day                string
	TU, CNY            decimal.Decimal
}

type eventRef struct{ Tenant, Subscriber, EventID string }

type daySum struct {
	Tenant    string
	Partition int
	Day       string
	TU, CNY   decimal.Decimal
	EventIDs  []string
}

type usageRow struct {
	Tenant, Subscriber string
	Partition          int
	Day                string
	TU, CNY            decimal.Decimal
}

// settleChunk: how many events are applied per hold of the lock; the calls waiting
// for it go in between.
const settleChunk = 64

// apply counts a stored batch (the worker has counted it the same way). It takes the
// lock itself, once per chunk of events, so that a batch of thousands of events does
// not hold a call up for milliseconds. Each chunk counts its events' usage and settles
// their holds under one hold of the lock, so a call never sees an event counted twice
// (usage and hold) or not at all: in between, the quota is as if the batch had come in
// smaller batches.
func (s *Service) apply(b *usageBatch, agg []daySum) {
	s.mu.Lock()
	for _, a := range agg {
		l := s.ledgerIn(QuotaKey{Tenant: a.Tenant}, a.Partition)
		l.addDay(a.Day, a.TU, a.CNY)
		if len(l.Holds) > 0 {
			l.settleLanded(a.EventIDs)
		}
	}
	s.mu.Unlock()
	for _, c := range b.chunks {
		s.mu.Lock()
		now := s.clock()
		for _, g := range c.sums {
			s.ledgerIn(QuotaKey{Tenant: g.Tenant}, g.Partition).addDay(g.Day, g.TU, g.CNY)
			if sub := s.ledgers[QuotaKey{g.Tenant, g.Subscriber}]; sub != nil {
				sub.addDay(g.Day, g.TU, g.CNY)
			}
		}
		for _, e := range c.events {
			if l := s.ledgers[QuotaKey{Tenant: e.Tenant}]; l != nil {
				l.settleEvent(e.EventID, now)
			}
			if sub := s.ledgers[QuotaKey{e.Tenant, e.Subscriber}]; sub != nil {
				sub.settleEvent(e.EventID, now)
			}
		}
		s.mu.Unlock()
		runtime.Gosched()
	}
}

// install sets the usage the worker restored from the warehouse (absolute, not added)
// and serves the restored partitions and subscriber quotas.
func (s *Service) install(parts []int, subKeys []QuotaKey, rows []usageRow, landed []string) {
	type fresh struct {
		part  int
		usage map[string]*Usage
	}
	found := map[QuotaKey]*fresh{}
	for _, r := range rows {
		k := QuotaKey{r.Tenant, r.Subscriber}
		f := found[k]
		if f == nil {
			f = &fresh{r.Partition, map[string]*Usage{}}
			found[k] = f
		}
		addUsage(f.usage, r.Day, r.TU, r.CNY)
		addUsage(f.usage, r.Day[:7], r.TU, r.CNY)
	}
	partSet := map[int]bool{}
	for _, p := range parts {
		partSet[p] = true
	}
	subSet := map[QuotaKey]bool{}
	for _, k := range subKeys {
		subSet[k] = true
	}
	for k, l := range s.ledgers {
		restored := (k.Subscriber == "" && partSet[l.Partition]) || subSet[k]
		if _, ok := found[k]; restored && !ok {
			l.Usage = map[string]*Usage{}
		}
	}
	for k, f := range found {
		s.ledgerIn(k, f.part).Usage = f.usage
	}
	if len(landed) > 0 {
		for _, l := range s.ledgers {
			if len(l.Holds) > 0 {
				l.settleLanded(landed)
			}
		}
	}
	for p := range partSet { // a partition revoked while its restore was queued stays unserved
		if s.assigned[p] {
			s.readyParts[p] = true
		}
	}
	for k := range subSet {
		s.syncedSubs[k] = true
	}
}

func (s *Service) setDefinition(k QuotaKey, d *Definition) {
	if d == nil {
		delete(s.definitions, k)
		if l := s.ledgers[k]; l != nil {
			l.Definition = nil
			if k.Subscriber != "" && len(l.Holds) == 0 {
				delete(s.ledgers, k)
				delete(s.syncedSubs, k)
			}
		}
		return
	}
	s.definitions[k] = d
	s.ledger(k).Definition = d
}

// assign: the worker took these partitions (it restores their usage next).
func (s *Service) assign(parts []int) {
	for _, p := range parts {
		s.assigned[p] = true
	}
}

func (s *Service) revoke(parts []int) {
	for _, p := range parts {
		delete(s.assigned, p)
		delete(s.readyParts, p)
	}
}

// setPartitions: the usage topic's partition count; the journal's holds need it to
// know their partition, so they are replayed now (once).
func (s *Service) setPartitions(n int) error {
	s.partitions = n
	s.partCache = map[string]int{}
	for _, l := range s.ledgers {
		l.Partition = s.partitionOf(l.Key.Tenant)
	}
	if s.journal == nil || s.replayed {
		return nil
	}
	s.replayed = true
	now := s.clock()
	live, err := s.journal.replay(now)
	if err != nil {
		return err
	}
	for _, jh := range live {
		ls := []*Ledger{s.ledger(jh.Key)}
		if jh.Key.Subscriber != "" {
			ls = append(ls, s.ledger(QuotaKey{Tenant: jh.Key.Tenant}))
		}
		for _, l := range ls {
			l.restoreHold(jh.Hold, now)
		}
	}
	if len(live) > 0 {
		log.Printf("quota server: %d reservations resumed from the journal", len(live))
	}
	return nil
}

func (s *Service) pendingIDs() []string {
	ids := []string{}
	for _, l := range s.ledgers {
		if l.pending.Sign() != 0 {
			for e := range l.byEvent {
				ids = append(ids, e)
			}
		}
	}
	return ids
}

func (s *Service) openReservations() int {
	n := 0
	for k, l := range s.ledgers {
		if k.Subscriber == "" {
			n += l.openCount()
		}
	}
	return n
}

// sweep expires reservations; with prune, also forgets old periods and idle ledgers
// and compacts the journal when it has grown long.
func (s *Service) sweep(prune bool) {
	now := s.clock()
	for k := range s.definitions {
		if l := s.ledgers[k]; l != nil && len(l.Holds) > 0 {
			l.expire(now)
		}
	}
	if prune {
		for k, l := range s.ledgers {
			l.expire(now)
			l.prune(now)
			if l.idle() {
				delete(s.ledgers, k)
			}
		}
	}
	if s.journal != nil && s.journal.lines > compactAfter {
		live := []JournalHold{}
		for k, l := range s.ledgers {
			for _, h := range l.Holds {
				// a subscriber reservation is journaled once, under the subscriber's key
				if k.Subscriber == "" {
					if hk, err := parseReservationID(h.ID); err == nil && hk.Subscriber != "" {
						continue
					}
				}
				live = append(live, JournalHold{k, *h})
			}
		}
		if err := s.journal.rewrite(live); err != nil {
			log.Printf("quota server: journal compaction failed: %v", err)
		}
	}
}
