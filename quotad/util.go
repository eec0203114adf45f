package main

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/shopspring/decimal"
)

// Amounts: Token Units and CNY as exact decimals (never floats), like the worker's
// Python Decimals. Answers write them without trailing zeros ("1500", "2.5").

var (
	zero  = decimal.New(0, -6)
	maxTU = decimal.New(1, 18)
)

// norm gives an amount the exponent -6 (amounts have at most 6 decimals; the warehouse
// stores Decimal(38, 6)): sums and comparisons of equal exponents need no rescaling,
// which in this decimal type is a big-integer power, on every call.
func norm(d decimal.Decimal) decimal.Decimal { return zero.Add(d) }

func fmtDec(d decimal.Decimal) string { return d.String() }

func minDec(a, b decimal.Decimal) decimal.Decimal {
	if a.Cmp(b) <= 0 {
		return a
	}
	return b
}

func maxDec(a, b decimal.Decimal) decimal.Decimal {
	if a.Cmp(b) >= 0 {
		return a
	}
	return b
}

// ---- periods: calendar days and months in Beijing time (UTC+8, no DST) -------------

const (
	dayMS     = 86_400_000
	beijingMS = 8 * 3_600_000
)

func periodKey(ms int64, period string) string {
	t := time.UnixMilli(ms + beijingMS).UTC()
	if period == "month" {
		return t.Format("2006-01")
	}
	return t.Format("2006-01-02")
}

// previousMonth: "2026-01" -> "2025-12".
func previousMonth(month string) string {
	t, err := time.Parse("2006-01", month)
	if err != nil {
		return month
	}
	return t.AddDate(0, -1, 0).Format("2006-01")
}

// ---- subscribers: pseudonyms as the worker makes them ------------------------------

var pseudonymRE = regexp.MustCompile(`^sub_[0-9a-f]{32}$`)

// pseudonymise is the keyed HMAC-SHA256 of a subscriber id, 128 bits, "sub_<32 hex>";
// an id that is already a pseudonym is returned unchanged (pipeline/events.py).
func pseudonymise(subscriber string, key []byte) string {
	if pseudonymRE.MatchString(subscriber) {
		return subscriber
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(subscriber))
	return "sub_" + hex.EncodeToString(mac.Sum(nil))[:32]
}

// ---- partitions: Kafka's default partitioner --------------------------------------

// murmur2 is Kafka's murmur2 hash (Java client, librdkafka, aiokafka).
func murmur2(data []byte) uint32 {
	const m = 0x5bd1e995
	const r = 24
	length := len(data)
	h := uint32(0x9747b28c) ^ uint32(length)
	for i := 0; i+4 <= length; i += 4 {
		k := uint32(data[i]) | uint32(data[i+1])<<8 | uint32(data[i+2])<<16 | uint32(data[i+3])<<24
		k *= m
		k ^= k >> r
		k *= m
		h *= m
		h ^= k
	}
	tail := length &^ 3
	switch length % 4 {
	case 3:
		h ^= uint32(data[tail+2]) << 16
		fallthrough
	case 2:
		h ^= uint32(data[tail+1]) << 8
		fallthrough
	case 1:
		h ^= uint32(data[tail])
		h *= m
	}
	h ^= h >> 13
	h *= m
	h ^= h >> 15
	return h
}

func partitionOf(key string, partitions int) int {
	if partitions <= 0 {
		partitions = 1
	}
	return int(murmur2([]byte(key))&0x7fffffff) % partitions
}

// ---- reservation ids ---------------------------------------------------------------

const reservationPrefix = "rsv_"

var (
	idPrefix = func() string {
		var b [4]byte
		if _, err := rand.Read(b[:]); err != nil {
			panic(err)
		}
		return hex.EncodeToString(b[:])
	}()
	idSeq atomic.Uint64
)

// reservationID names its quota, so any worker can route it:
// rsv_<b64 tenant>.<b64 subscriber>.<process prefix><sequence, hex>.
func reservationID(k QuotaKey) string {
	return fmt.Sprintf("%s%s.%s.%s%08x", reservationPrefix,
		base64.RawURLEncoding.EncodeToString([]byte(k.Tenant)),
		base64.RawURLEncoding.EncodeToString([]byte(k.Subscriber)),
		idPrefix, idSeq.Add(1))
}

// parseReservationID gives the quota a reservation id belongs to.
func parseReservationID(id string) (QuotaKey, error) {
	if !strings.HasPrefix(id, reservationPrefix) {
		return QuotaKey{}, notAReservation(id)
	}
	parts := strings.Split(id[len(reservationPrefix):], ".")
	if len(parts) != 3 {
		return QuotaKey{}, notAReservation(id)
	}
	tenant, err1 := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[0], "="))
	sub, err2 := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err1 != nil || err2 != nil || !utf8.Valid(tenant) || !utf8.Valid(sub) {
		return QuotaKey{}, notAReservation(id)
	}
	return QuotaKey{string(tenant), string(sub)}, nil
}

func notAReservation(id string) error {
	return &QuotaError{Kind: errNotFound, Msg: fmt.Sprintf("not a reservation id: %s", pyRepr(id))}
}

// pyRepr quotes a string the way the worker's messages do ('...').
func pyRepr(s string) string {
	if strings.Contains(s, "'") && !strings.Contains(s, `"`) {
		return `"` + s + `"`
	}
	return "'" + strings.ReplaceAll(s, "'", `\'`) + "'"
}

// isoMS: epoch ms as ISO 8601 UTC with milliseconds, "2026-11-28T02:00:30.123+00:00".
func isoMS(ms int64) string {
	return time.UnixMilli(ms).UTC().Format("2006-01-02T15:04:05.000") + "+00:00"
}
