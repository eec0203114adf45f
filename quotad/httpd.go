package main

// The HTTP side (contract section 4; docs/quotas.md, "The HTTP API"):
//
//	GET    /v1/quotas/{tenant_id}[?subscriber_id=S]
//	POST   /v1/quotas/{tenant_id}/reservations   {"token_units": n, "ttl_s": t[, "subscriber_id": s]}
//	POST   /v1/reservations/{id}/commit          {"token_units": used[, "event_id": e]}
//	DELETE /v1/reservations/{id}
//
// A call for a tenant whose usage partition another worker owns is forwarded there;
// every other path goes to the worker's own pages (health, status, query, metrics).

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/shopspring/decimal"
)

const (
	forwardedHeader = "X-Tokenmeter-Forwarded"
	ownerHeader     = "X-Tokenmeter-Owner" // on answers forwarded from the owning worker
	maxBody         = 1 << 20
	defaultTTLS     = 30.0
	contentJSON     = "application/json"
)

type call struct {
	name          string // status | reserve | commit | release
	tenant        string // "" when the reservation id is malformed (answered 404)
	reservationID string
}

type reply struct {
	status  int
	body    []byte
	headers [][2]string
	ctype   string
}

var allowed = map[string]string{"status": "GET", "reserve": "POST", "commit": "POST", "release": "DELETE"}

// match: the quota call a request is, nil if it is no quota path, or a ready reply
// (405) for a wrong method on a quota path.
func match(method, path string) (*call, *reply) {
	parts := strings.Split(path, "/")
	if len(parts) < 4 || parts[1] != "v1" || parts[3] == "" {
		return nil, nil
	}
	name := ""
	switch parts[2] {
	case "quotas":
		if len(parts) == 4 {
			name = "status"
		} else if len(parts) == 5 && parts[4] == "reservations" {
			name = "reserve"
		}
	case "reservations":
		if len(parts) == 4 {
			name = "release"
		} else if len(parts) == 5 && parts[4] == "commit" {
			name = "commit"
		}
	}
	if name == "" {
		return nil, nil
	}
	if method != allowed[name] {
		r := errorReply(405, "method not allowed: use "+allowed[name])
		r.headers = append(r.headers, [2]string{"Allow", allowed[name]})
		return nil, r
	}
	segment, err := url.PathUnescape(parts[3])
	if err != nil {
		segment = parts[3]
	}
	if name == "status" || name == "reserve" {
		return &call{name: name, tenant: segment}, nil
	}
	c := &call{name: name, reservationID: segment}
	if k, err := parseReservationID(segment); err == nil {
		c.tenant = k.Tenant
	}
	return c, nil
}

// ---- JSON answers ---------------------------------------------------------------------

func jsonBytes(v any) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic(err) // only our own answer types come here
	}
	return bytes.TrimRight(b.Bytes(), "\n")
}

func errorReply(status int, message string) *reply {
	return &reply{status: status, body: jsonBytes(map[string]string{"error": message})}
}

type settlementJSON struct {
	ReservationID string  `json:"reservation_id"`
	Outcome       string  `json:"outcome"`
	Granted       string  `json:"granted"`
	Committed     string  `json:"committed"`
	Released      string  `json:"released"`
	OverGrant     bool    `json:"over_grant"`
	EventID       *string `json:"event_id"`
}

func settlementOf(s *Settlement) settlementJSON {
	return settlementJSON{s.ReservationID, s.Outcome, fmtDec(s.Granted), fmtDec(s.Committed), fmtDec(s.Released), s.OverGrant, s.EventID}
}

type statusJSON struct {
	TenantID         string   `json:"tenant_id"`
	SubscriberID     *string  `json:"subscriber_id"`
	PeriodType       string   `json:"period_type"`
	Period           string   `json:"period"`
	Limit            string   `json:"limit"`
	Used             string   `json:"used"`
	Reserved         string   `json:"reserved"`
	Pending          string   `json:"pending"`
	Remaining        string   `json:"remaining"`
	State            string   `json:"state"`
	Hard             bool     `json:"hard"`
	Thresholds       []string `json:"thresholds"`
	Crossed          []string `json:"crossed"`
	OpenReservations int      `json:"open_reservations"`
	LimitCNY         *string  `json:"limit_cny,omitempty"`
	UsedCNY          *string  `json:"used_cny,omitempty"`
}

func fmtAll(ds []decimal.Decimal) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = fmtDec(d)
	}
	return out
}

func statusOf(s Status) statusJSON {
	d := s.Definition
	out := statusJSON{
		TenantID: s.Key.Tenant, PeriodType: d.Period, Period: s.Period,
		Limit: fmtDec(d.LimitTU), Used: fmtDec(s.Used.TU), Reserved: fmtDec(s.Reserved.Add(s.Pending)),
		Pending: fmtDec(s.Pending), Remaining: fmtDec(s.Remaining), State: s.State, Hard: d.Hard,
		Thresholds: fmtAll(d.Thresholds), Crossed: fmtAll(s.Crossed), OpenReservations: s.OpenReservations,
	}
	if s.Key.Subscriber != "" {
		sub := s.Key.Subscriber
		out.SubscriberID = &sub
	}
	if d.LimitCNY != nil {
		limit, used := fmtDec(*d.LimitCNY), fmtDec(s.Used.CNY)
		out.LimitCNY, out.UsedCNY = &limit, &used
	}
	return out
}

func refuse(err error) *reply {
	var qe *QuotaError
	if !errors.As(err, &qe) {
		return errorReply(500, "internal error")
	}
	body := map[string]any{"error": qe.Msg}
	if qe.Settlement != nil {
		body["reservation"] = settlementOf(qe.Settlement)
	}
	r := &reply{status: qe.status(), body: jsonBytes(body)}
	if r.status == 503 {
		r.headers = [][2]string{{"Retry-After", "1"}}
	}
	return r
}

// ---- request bodies ---------------------------------------------------------------------

// callBody: the members of a call's body (each as sent; nil when absent).
type callBody struct {
	TokenUnits   json.RawMessage `json:"token_units"`
	TTLS         json.RawMessage `json:"ttl_s"`
	SubscriberID json.RawMessage `json:"subscriber_id"`
	EventID      json.RawMessage `json:"event_id"`
}

func parseBody(raw []byte, example string) (*callBody, error) {
	var body callBody
	if err := json.Unmarshal(raw, &body); err != nil {
		// members are RawMessages, which take any JSON: a type error is the body's own
		var wrongType *json.UnmarshalTypeError
		if errors.As(err, &wrongType) {
			return nil, badRequest("body must be a JSON object: %s", example)
		}
		return nil, badRequest("body must be JSON: %s", example)
	}
	if string(bytes.TrimSpace(raw)) == "null" {
		return nil, badRequest("body must be a JSON object: %s", example)
	}
	return &body, nil
}

func isNull(raw json.RawMessage) bool { return raw == nil || string(raw) == "null" }

var micro = decimal.New(1, -6)

// The bounds of an amount's text, checked before any arithmetic: a decimal is a big
// integer and an exponent, and comparing or rescaling one means a power of ten as long
// as the exponent, so "1e999999999" would be a billion digits (minutes and GBs, on the
// lock every call waits for). No valid amount comes near: at most 19 digits and 6
// decimals.
const (
	maxAmountChars    = 40 // digits and point, before any exponent
	maxAmountExponent = 30 // |exponent| as written ("e-30" .. "e+30")
)

// checkAmountText refuses an amount's text (sign, digits, point, exponent) that is
// longer or has a larger exponent than the bounds above; other malformed text is left
// to the decimal parser.
func checkAmountText(text, name string) error {
	mantissa, exponent, scientific := text, "", false
	if i := strings.IndexAny(text, "eE"); i >= 0 {
		mantissa, exponent, scientific = text[:i], text[i+1:], true
	}
	if len(strings.TrimLeft(mantissa, "+-")) > maxAmountChars {
		return badRequest("%s: too long a number (at most %d digits)", name, maxAmountChars)
	}
	if scientific {
		digits := strings.TrimLeft(strings.TrimLeft(exponent, "+-"), "0")
		if digits != "" && strings.Trim(digits, "0123456789") == "" {
			if n, err := strconv.Atoi(digits); err != nil || n > maxAmountExponent {
				return badRequest("%s: the exponent must be within -%d..%d", name, maxAmountExponent, maxAmountExponent)
			}
		}
	}
	return nil
}

// toTU: a TU amount from JSON (number or decimal string), exact to 6 decimals.
func toTU(raw json.RawMessage, name string) (decimal.Decimal, error) {
	var text string
	switch {
	case len(raw) > 0 && raw[0] == '"':
		if err := json.Unmarshal(raw, &text); err != nil {
			return zero, badRequest("%s: must be a number", name)
		}
		text = strings.TrimSpace(text)
		switch strings.TrimLeft(strings.ToLower(text), "+-") {
		case "nan", "snan", "inf", "infinity":
			return zero, badRequest("%s: must be finite", name)
		}
	case len(raw) > 0 && (raw[0] == '-' || (raw[0] >= '0' && raw[0] <= '9')):
		text = string(raw)
	default:
		return zero, badRequest("%s: must be a number", name)
	}
	if err := checkAmountText(text, name); err != nil {
		return zero, err
	}
	amount, err := decimal.NewFromString(text)
	if err != nil {
		if len(text) > 2*maxAmountChars { // what the answer echoes stays short
			text = text[:2*maxAmountChars] + "..."
		}
		return zero, badRequest("%s: must be a number, got %s", name, pyRepr(text))
	}
	if amount.Sign() < 0 {
		return zero, badRequest("%s: must be >= 0", name)
	}
	// the exact checks rescale (a big-integer power): skipped when the text shows they
	// pass, a plain number of under 19 digits with at most 6 decimals
	plain := len(text) < 19 && !strings.ContainsAny(text, "eE")
	if !plain && amount.Cmp(maxTU) > 0 {
		return zero, badRequest("%s: must be <= 1e18", name)
	}
	if amount.Exponent() < -6 && !amount.Mod(micro).IsZero() {
		return zero, badRequest("%s: at most 6 decimal places", name)
	}
	return norm(amount.Truncate(6)), nil // exact (checked above): "1.0000000" as 1.000000
}

func optionalString(raw json.RawMessage, name string) (*string, error) {
	if isNull(raw) {
		return nil, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil || s == "" || utf8.RuneCountInString(s) > 256 {
		return nil, badRequest("%s: must be a non-empty string", name)
	}
	return &s, nil
}

// The two answers on every model call's path, written directly (the same JSON as the
// encoder would write, without its reflection).
func grantBody(g Grant) []byte {
	b := append(make([]byte, 0, 192), `{"reservation_id":`...)
	b = appendOptional(b, g.ReservationID)
	b = appendMember(b, "requested", fmtDec(g.Requested))
	b = appendMember(b, "granted", fmtDec(g.Granted))
	b = appendMember(b, "expires_at", isoMS(g.ExpiresMS))
	b = strconv.AppendBool(append(b, `,"over_limit":`...), g.OverLimit)
	return append(b, '}')
}

func settlementBody(st *Settlement) []byte {
	b := append(make([]byte, 0, 224), `{"reservation_id":`...)
	b = jsonString(b, st.ReservationID)
	b = appendMember(b, "outcome", st.Outcome)
	b = appendMember(b, "granted", fmtDec(st.Granted))
	b = appendMember(b, "committed", fmtDec(st.Committed))
	b = appendMember(b, "released", fmtDec(st.Released))
	b = strconv.AppendBool(append(b, `,"over_grant":`...), st.OverGrant)
	b = appendOptional(append(b, `,"event_id":`...), st.EventID)
	return append(b, '}')
}

// appendMember: ,"name":"value" (value is plain ASCII: an amount, a time, an outcome).
func appendMember(b []byte, name, value string) []byte {
	b = append(append(append(b, `,"`...), name...), `":"`...)
	return append(append(b, value...), '"')
}

// appendOptional: a JSON string, or null.
func appendOptional(b []byte, s *string) []byte {
	if s == nil {
		return append(b, "null"...)
	}
	return jsonString(b, *s)
}

// ---- reading a call's arguments (before the lock) -----------------------------------

// args: what a call's query and body ask for, read and checked. This happens before the
// lock is taken: its cost is the client's to choose (within the bounds toTU sets), and
// every other call waits while the lock is held.
type args struct {
	subscriber string // status: ?subscriber_id=; reserve: "subscriber_id"
	amount     decimal.Decimal
	ttl        float64
	eventID    *string
}

func parseArgs(c *call, query string, raw []byte) (*args, error) {
	a := &args{}
	switch c.name {
	case "status":
		if query != "" {
			if q, err := url.ParseQuery(query); err == nil {
				a.subscriber = q.Get("subscriber_id")
			}
		}
	case "reserve":
		body, err := parseBody(raw, `{"token_units": n, "ttl_s": t}`)
		if err != nil {
			return nil, err
		}
		if body.TokenUnits == nil {
			return nil, badRequest(`token_units: required ({"token_units": n, "ttl_s": t})`)
		}
		if a.amount, err = toTU(body.TokenUnits, "token_units"); err != nil {
			return nil, err
		}
		a.ttl = defaultTTLS
		if body.TTLS != nil {
			first := body.TTLS[0]
			if first != '-' && (first < '0' || first > '9') {
				return nil, badRequest("ttl_s: must be a number of seconds")
			}
			if a.ttl, err = strconv.ParseFloat(string(body.TTLS), 64); err != nil {
				return nil, badRequest("ttl_s: must be a number of seconds")
			}
		}
		sub, err := optionalString(body.SubscriberID, "subscriber_id")
		if err != nil {
			return nil, err
		}
		if sub != nil {
			a.subscriber = *sub
		}
	case "commit":
		if c.tenant == "" {
			return nil, notAReservation(c.reservationID)
		}
		body, err := parseBody(raw, `{"token_units": used}`)
		if err != nil {
			return nil, err
		}
		if body.TokenUnits == nil {
			return nil, badRequest(`token_units: required ({"token_units": used})`)
		}
		if a.amount, err = toTU(body.TokenUnits, "token_units"); err != nil {
			return nil, err
		}
		if a.eventID, err = optionalString(body.EventID, "event_id"); err != nil {
			return nil, err
		}
	default: // release
		if c.tenant == "" {
			return nil, notAReservation(c.reservationID)
		}
	}
	return a, nil
}

// ---- answering a call (the lock is held) ------------------------------------------------

// handle answers a call whose arguments were read (or refused: bad) since started;
// lines: what the call adds to the journal, to write before the answer goes out (after
// the lock: the write is a system call, sometimes a slow one).
func (srv *Server) handle(c *call, a *args, bad error, started time.Time) (r *reply, lines []byte) {
	outcome := ""
	err := bad
	if err == nil {
		r, err = srv.answer(c, a, &outcome)
	} else if c.name == "reserve" {
		outcome = "error"
	}
	if err != nil {
		r = refuse(err)
	}
	if j := srv.service.journal; j != nil {
		lines = j.take()
	}
	srv.observe(c.name, outcome, time.Since(started).Seconds())
	return r, lines
}

func (srv *Server) answer(c *call, a *args, outcome *string) (*reply, error) {
	s := srv.service
	switch c.name {
	case "status":
		st, err := s.get(c.tenant, a.subscriber)
		if err != nil {
			return nil, err
		}
		return &reply{status: 200, body: jsonBytes(statusOf(st))}, nil
	case "reserve":
		*outcome = "error"
		g, err := s.reserve(c.tenant, a.amount, a.ttl, a.subscriber)
		if err != nil {
			return nil, err
		}
		switch {
		case g.Granted.Sign() <= 0:
			*outcome = "denied"
		case g.Granted.Cmp(g.Requested) < 0:
			*outcome = "partial"
		default:
			*outcome = "granted"
		}
		status := 200
		if g.ReservationID != nil {
			status = 201
		}
		return &reply{status: status, body: grantBody(g)}, nil
	case "commit":
		st, err := s.commit(c.reservationID, a.amount, a.eventID)
		if err != nil {
			return nil, err
		}
		return &reply{status: 200, body: settlementBody(st)}, nil
	default: // release
		st, err := s.release(c.reservationID)
		if err != nil {
			return nil, err
		}
		return &reply{status: 200, body: settlementBody(st)}, nil
	}
}

// observe counts a call for the worker's metrics (reservations by outcome, and the
// time each call took here, in the worker's buckets, QUOTA_DURATION_BUCKETS).
func (srv *Server) observe(name, outcome string, seconds float64) {
	if outcome != "" {
		srv.outcomes[outcome]++
	}
	found := srv.durations[name]
	if found == nil {
		found = make([]float64, len(srv.buckets)+2)
		srv.durations[name] = found
	}
	found[sort.SearchFloat64s(srv.buckets, seconds)]++
	found[len(found)-1] += seconds
}

// ---- HTTP -------------------------------------------------------------------------------

// route: where requests are passed on, the worker's own pages or another worker; the
// address to call is built from its scheme and host, never from a client's text.
type route struct {
	url      string // as the worker gave it (answered in X-Tokenmeter-Owner)
	scheme   string
	hostPort string
	host     string
	port     int
}

func newRoute(raw string) route {
	r := route{url: raw}
	if u, err := url.Parse(raw); err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host != "" {
		r.scheme, r.hostPort = u.Scheme, u.Host
		r.host = u.Hostname()
		r.port, _ = strconv.Atoi(u.Port())
		if r.port == 0 {
			r.port = 80
		}
	}
	return r
}

var errBadTarget = errors.New("the request target must be a path: /... (origin-form)")

// originForm: whether a request target is a path with an optional query ("/...?..."),
// the only form this server takes: not an absolute URL ("http://host/..."), an
// authority ("host:port", CONNECT's), "*", or anything else that is not a path
// ("@host:port/...", which appended to "http://127.0.0.1:port" names another host).
// Control characters, spaces and fragments are refused too.
func originForm(target string) bool {
	if target == "" || target[0] != '/' {
		return false
	}
	for i := 0; i < len(target); i++ {
		if b := target[i]; b <= ' ' || b == 0x7f || b == '#' {
			return false
		}
	}
	return true
}

// forwardURL: the address of target (an origin-form path and query) at dest: dest's
// fixed scheme and host, the target's path and query. errBadTarget for a target that is
// not a path.
func forwardURL(dest route, target string) (*url.URL, error) {
	if !originForm(target) {
		return nil, errBadTarget
	}
	rawPath, query, _ := strings.Cut(target, "?")
	path, err := url.PathUnescape(rawPath)
	if err != nil {
		return nil, errBadTarget
	}
	if dest.hostPort == "" {
		return nil, fmt.Errorf("no address: %s", pyRepr(dest.url))
	}
	return &url.URL{Scheme: dest.scheme, Host: dest.hostPort, Path: path, RawPath: rawPath, RawQuery: query}, nil
}

// dispatch answers one request: a quota call here (or at the worker that owns its
// tenant), anything else at the worker's own pages.
func (srv *Server) dispatch(req *request) *reply {
	c, ready := match(req.method, req.path)
	if ready != nil {
		return ready
	}
	if c == nil {
		return srv.proxy(req, srv.faust, false, 300*time.Second)
	}
	started := time.Now()
	a, bad := parseArgs(c, req.query, req.body)
	s := srv.service
	s.mu.Lock()
	if dest, ok := srv.owner(c); ok && req.forwarded == "" {
		s.mu.Unlock()
		return srv.proxy(req, dest, true, 30*time.Second)
	}
	r, lines := srv.handle(c, a, bad, started)
	s.mu.Unlock()
	if len(lines) > 0 {
		if err := s.journal.write(lines); err != nil {
			log.Printf("the reservation journal cannot be written: %v", err)
			return errorReply(500, "the reservation journal cannot be written: "+err.Error())
		}
	}
	return r
}

// owner: the route to the worker that owns the call's tenant, when that is another one.
func (srv *Server) owner(c *call) (route, bool) {
	s := srv.service
	if c.tenant == "" || s.owns(c.tenant) {
		return route{}, false
	}
	found, ok := srv.routes[s.partitionOf(c.tenant)]
	if !ok || (found.host == srv.host && found.port == srv.port) {
		return route{}, false // no owner known yet, or us: answered here (503 until restored)
	}
	return found, true
}

// proxy passes a request on: to the worker's own pages, or to the worker that owns the
// tenant (toOwner: marked forwarded, so that one answers it itself).
func (srv *Server) proxy(req *request, dest route, toOwner bool, timeout time.Duration) *reply {
	where, err := forwardURL(dest, req.target)
	if errors.Is(err, errBadTarget) {
		return errorReply(400, err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var out *http.Request
	if err == nil {
		out, err = http.NewRequestWithContext(ctx, req.method, where.String(), bytes.NewReader(req.body))
	}
	if err == nil {
		out.URL, out.Host = where, where.Host // the URL as built, not as parsed again
		if toOwner {
			out.Header.Set(forwardedHeader, "1")
		}
		for _, h := range [...][2]string{
			{"Accept", req.accept}, {"Content-Type", req.contentType}, {"Accept-Encoding", req.acceptEncoding},
		} {
			if h[1] != "" {
				out.Header.Set(h[0], h[1])
			}
		}
		var resp *http.Response
		if resp, err = srv.client.Do(out); err == nil {
			defer resp.Body.Close()
			data, rerr := io.ReadAll(resp.Body)
			if rerr == nil {
				r := &reply{status: resp.StatusCode, body: data, ctype: resp.Header.Get("Content-Type")}
				for _, name := range []string{"Content-Encoding", "Retry-After", "Allow"} {
					if v := resp.Header.Get(name); v != "" {
						r.headers = append(r.headers, [2]string{name, v})
					}
				}
				if toOwner {
					r.headers = append(r.headers, [2]string{ownerHeader, dest.url})
				}
				return r
			}
			err = rerr
		}
	}
	what := "the worker's pages"
	if toOwner {
		what = "the owning worker " + dest.url
	}
	r := errorReply(503, fmt.Sprintf("%s cannot be reached yet (%s); retry", what, shortError(err)))
	r.headers = [][2]string{{"Retry-After", "1"}}
	return r
}

func shortError(err error) string {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return op.Err.Error()
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return "timed out"
	}
	return err.Error()
}
