package main

// Shared vectors: each value below is what the worker's Python gives for the same input
// (aiokafka's murmur2 partitioner, pipeline/events.py pseudonymise, plans.period_key),
// so the two processes agree on partitions, pseudonyms and periods.

import (
	"strings"
	"testing"

	"github.com/shopspring/decimal"
)

func TestPartitionsAreKafkasDefault(t *testing.T) {
	cases := []struct {
		key      string
		of4, of7 int
	}{
		{"", 1, 2}, {"a", 0, 5}, {"ab", 2, 0}, {"abc", 3, 4}, {"abcd", 0, 5},
		{"tn-cmcc-0001", 0, 3}, {"tn-ü", 3, 6}, {"tn-bench-abc123-17", 1, 4},
		{strings.Repeat("x", 33), 1, 5},
	}
	for _, c := range cases {
		if got := partitionOf(c.key, 4); got != c.of4 {
			t.Errorf("partitionOf(%q, 4) = %d, want %d", c.key, got, c.of4)
		}
		if got := partitionOf(c.key, 7); got != c.of7 {
			t.Errorf("partitionOf(%q, 7) = %d, want %d", c.key, got, c.of7)
		}
	}
}

func TestPseudonymsAreTheWorkers(t *testing.T) {
	key := []byte(strings.Repeat("k", 32))
	want := "sub_e9a23f4103a74225d2a879af8d8aaefb"
	if got := pseudonymise("13800138000", key); got != want {
		t.Fatalf("pseudonymise = %s, want %s", got, want)
	}
	if got := pseudonymise(want, key); got != want {
		t.Fatalf("a pseudonym must stay as it is, got %s", got)
	}
}

func TestPeriodsAreBeijingDaysAndMonths(t *testing.T) {
	cases := []struct {
		ms         int64
		day, month string
	}{
		{0, "1970-01-01", "1970-01"},
		{1764259199999, "2025-11-27", "2025-11"},
		{1764259200000, "2025-11-28", "2025-11"},
		{1767196800000, "2026-01-01", "2026-01"},
	}
	for _, c := range cases {
		if d, m := periodKey(c.ms, "day"), periodKey(c.ms, "month"); d != c.day || m != c.month {
			t.Errorf("periodKey(%d) = %s %s, want %s %s", c.ms, d, m, c.day, c.month)
		}
	}
	if got := previousMonth("2026-01"); got != "2025-12" {
		t.Errorf("previousMonth(2026-01) = %s", got)
	}
}

func TestReservationIDsNameTheirQuota(t *testing.T) {
	k := QuotaKey{"tn-ü.x", "sub_" + strings.Repeat("1", 32)}
	id := reservationID(k)
	got, err := parseReservationID(id)
	if err != nil || got != k {
		t.Fatalf("parseReservationID(%s) = %v, %v", id, got, err)
	}
	for _, bad := range []string{"rsv_nope", "xyz", "rsv_a.b", "rsv_!!.AA.1"} {
		if _, err := parseReservationID(bad); err == nil {
			t.Errorf("parseReservationID(%q) accepted", bad)
		}
	}
}

func TestAmountsAreExactAndShortest(t *testing.T) {
	for in, want := range map[string]string{"1500.000000": "1500", "2.50": "2.5", "0": "0", "0.000001": "0.000001"} {
		d, err := dec(in)
		if err != nil || fmtDec(d) != want {
			t.Errorf("dec(%s) = %s, %v; want %s", in, fmtDec(d), err, want)
		}
	}
	a, _ := dec("0.1")
	b, _ := dec("0.2")
	if sum := a.Add(b); !sum.Equal(decimal.RequireFromString("0.3")) || sum.Exponent() != -6 {
		t.Errorf("0.1 + 0.2 = %s (exponent %d)", sum, sum.Exponent())
	}
}
