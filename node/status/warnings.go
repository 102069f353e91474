package status

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// Warning is one log record at Warn or above.
type Warning struct {
	Time  time.Time `json:"time"`
	Level string    `json:"level"`
	Msg   string    `json:"msg"`
	Attrs string    `json:"attrs,omitempty"` // key=value pairs, as the text log writes them
}

// WarnRing keeps the last records at Warn and above that pass through the handlers
// it makes, and counts them all. It is safe for concurrent use.
type WarnRing struct {
	mu    sync.Mutex
	buf   []Warning // ring of cap n
	next  int
	total uint64
}

// DefaultWarnings is how many warnings a node keeps for its status page.
const DefaultWarnings = 50

// NewWarnRing keeps the last n warnings (n < 1 means DefaultWarnings).
func NewWarnRing(n int) *WarnRing {
	if n < 1 {
		n = DefaultWarnings
	}
	return &WarnRing{buf: make([]Warning, 0, n)}
}

// Handler wraps next: every record goes on to next as before, and those at Warn and
// above are also kept here, even where next's level filters them out.
func (r *WarnRing) Handler(next slog.Handler) slog.Handler {
	return &ringHandler{ring: r, next: next}
}

// Recent is the kept warnings, oldest first.
func (r *WarnRing) Recent() []Warning {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Warning, 0, len(r.buf))
	if len(r.buf) == cap(r.buf) {
		out = append(out, r.buf[r.next:]...)
		return append(out, r.buf[:r.next]...)
	}
	return append(out, r.buf...)
}

// Total is how many warnings have passed, kept or not.
func (r *WarnRing) Total() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.total
}

func (r *WarnRing) add(w Warning) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.total++
	if len(r.buf) < cap(r.buf) {
		r.buf = append(r.buf, w)
		return
	}
	r.buf[r.next] = w
	r.next = (r.next + 1) % cap(r.buf)
}

type ringHandler struct {
	ring   *WarnRing
	next   slog.Handler
	attrs  string // from WithAttrs, formatted
	prefix string // from WithGroup: "group."
}

func (h *ringHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelWarn || h.next.Enabled(ctx, l)
}

func (h *ringHandler) Handle(ctx context.Context, rec slog.Record) error {
	if rec.Level >= slog.LevelWarn {
		var b strings.Builder
		b.WriteString(h.attrs)
		rec.Attrs(func(a slog.Attr) bool {
			appendAttr(&b, h.prefix, a)
			return true
		})
		h.ring.add(Warning{Time: rec.Time, Level: rec.Level.String(), Msg: rec.Message, Attrs: strings.TrimSpace(b.String())})
	}
	if !h.next.Enabled(ctx, rec.Level) {
		return nil
	}
	return h.next.Handle(ctx, rec)
}

func (h *ringHandler) WithAttrs(as []slog.Attr) slog.Handler {
	var b strings.Builder
	b.WriteString(h.attrs)
	for _, a := range as {
		appendAttr(&b, h.prefix, a)
	}
	return &ringHandler{ring: h.ring, next: h.next.WithAttrs(as), attrs: b.String(), prefix: h.prefix}
}

func (h *ringHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	return &ringHandler{ring: h.ring, next: h.next.WithGroup(name), attrs: h.attrs, prefix: h.prefix + name + "."}
}

func appendAttr(b *strings.Builder, prefix string, a slog.Attr) {
	a.Value = a.Value.Resolve()
	if a.Equal(slog.Attr{}) {
		return
	}
	if a.Value.Kind() == slog.KindGroup {
		p := prefix
		if a.Key != "" {
			p += a.Key + "."
		}
		for _, g := range a.Value.Group() {
			appendAttr(b, p, g)
		}
		return
	}
	v := a.Value.String()
	if strings.ContainsAny(v, " \t\"=") {
		v = fmt.Sprintf("%q", v)
	}
	fmt.Fprintf(b, " %s%s=%s", prefix, a.Key, v)
}
