package spec

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// decoder walks the yaml.Node tree itself, rather than letting yaml.v3 fill the struct, so
// that it can record the line of every field and say precisely what is wrong where: yaml.v3's
// own errors name neither the field path nor, for type errors, a useful expectation, and it
// silently truncates 1.5 into an int.
type decoder struct {
	file   string
	what   string          // what the document is, for messages about its shape: "spec"
	lines  map[string]int  // field path -> line of its key
	failed map[string]bool // field paths whose value could not be decoded
	errs   []error
}

func (d *decoder) failf(line int, field, format string, args ...any) {
	d.errs = append(d.errs, &fieldError{
		file:  d.file,
		line:  line,
		field: field,
		msg:   fmt.Sprintf(format, args...),
		kind:  ErrDecode,
	})
	if field != "" {
		d.failed[field] = true
	}
}

// failedAt reports whether the field at path, or the section holding it, failed to decode.
func (d *decoder) failedAt(path string) bool {
	section, _, _ := strings.Cut(path, ".")
	return d.failed[path] || d.failed[section]
}

// yamlLine pulls the line out of yaml.v3's "yaml: line 7: ..." so the error can lead with
// "file:7:" like every other.
var yamlLine = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// document parses src and returns its top-level mapping.
func (d *decoder) document(src []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(src))
	var doc yaml.Node
	err := dec.Decode(&doc)
	if errors.Is(err, io.EOF) {
		return nil, &fieldError{file: d.file, msg: "empty " + d.what, kind: ErrDecode}
	}
	if err != nil {
		return nil, d.syntaxError(err)
	}
	var next yaml.Node
	switch err := dec.Decode(&next); {
	case err == nil:
		return nil, &fieldError{file: d.file, line: next.Line, msg: fmt.Sprintf("more than one YAML document; a %s is one", d.what), kind: ErrDecode}
	case !errors.Is(err, io.EOF):
		return nil, d.syntaxError(err)
	}
	root := resolve(&doc)
	if root.Kind == yaml.DocumentNode && len(root.Content) == 1 {
		root = resolve(root.Content[0])
	}
	if root.Kind == yaml.ScalarNode && root.ShortTag() == "!!null" {
		return nil, &fieldError{file: d.file, msg: "empty " + d.what, kind: ErrDecode}
	}
	if root.Kind != yaml.MappingNode {
		return nil, &fieldError{file: d.file, line: root.Line,
			msg: fmt.Sprintf("expected a mapping of fields at the top level, found %s", kindName(root)), kind: ErrDecode}
	}
	return root, nil
}

func (d *decoder) syntaxError(err error) error {
	e := &fieldError{file: d.file, msg: err.Error(), kind: ErrDecode, cause: err}
	if m := yamlLine.FindStringSubmatch(err.Error()); m != nil {
		e.line, _ = strconv.Atoi(m[1])
		e.msg = m[2]
	}
	return e
}

// field is one YAML-visible field of a struct.
type field struct {
	name string
	v    reflect.Value
}

// fieldsOf lists the fields of the struct pointed to by ptr, by their yaml tag.
func fieldsOf(ptr any) []field {
	v := reflect.ValueOf(ptr).Elem()
	var fs []field
	for i := 0; i < v.NumField(); i++ {
		tag, ok := v.Type().Field(i).Tag.Lookup("yaml")
		if !ok {
			continue
		}
		fs = append(fs, field{name: strings.Split(tag, ",")[0], v: v.Field(i)})
	}
	return fs
}

// mapping decodes the mapping n into fields. section is the path of the mapping ("" at the
// top level, "model" inside model), prefix the same with a trailing dot.
func (d *decoder) mapping(n *yaml.Node, section, prefix string, fields []field) {
	first := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		key, val := resolve(n.Content[i]), resolve(n.Content[i+1])
		if key.Kind != yaml.ScalarNode {
			d.failf(key.Line, section, "expected a field name, found %s", kindName(key))
			continue
		}
		f, ok := lookup(fields, key.Value)
		if !ok {
			in := ""
			if section != "" {
				in = " in " + section
			}
			d.failf(key.Line, "", "unknown field %q%s (known: %s)", key.Value, in, names(fields))
			continue
		}
		path := prefix + f.name
		if line, dup := first[f.name]; dup {
			d.failf(key.Line, path, "repeated; first given at line %d", line)
			continue
		}
		first[f.name] = key.Line
		if val.Kind == yaml.ScalarNode && val.ShortTag() == "!!null" {
			continue // "lr:" with nothing after it is the same as leaving lr out
		}
		d.lines[path] = key.Line
		d.value(key.Line, path, val, f.v)
	}
}

// value decodes one field's value node into v.
func (d *decoder) value(line int, path string, n *yaml.Node, v reflect.Value) {
	if v.Kind() == reflect.Struct {
		if n.Kind != yaml.MappingNode {
			d.failf(line, path, "expected a mapping of fields, found %s", kindName(n))
			return
		}
		d.mapping(n, path, path+".", fieldsOf(v.Addr().Interface()))
		return
	}
	if v.Kind() == reflect.Slice && v.Type().Elem().Kind() == reflect.String {
		d.stringList(line, path, n, v)
		return
	}
	var want string
	var tags []string // resolved YAML tags accepted for this kind
	switch v.Kind() {
	case reflect.String:
		want, tags = "a string", nil // any scalar reads as its text
	case reflect.Bool:
		want = "true or false" // only !!bool: yes, on and 1 are not booleans
	case reflect.Int:
		want, tags = "an integer", []string{"!!int", "!!float"}
	case reflect.Uint64:
		want, tags = "a non-negative integer", []string{"!!int", "!!float"}
	case reflect.Float64:
		want, tags = "a number", []string{"!!int", "!!float"}
	default:
		panic(fmt.Sprintf("spec: field %s has unsupported kind %s", path, v.Kind()))
	}
	if n.Kind != yaml.ScalarNode {
		d.failf(line, path, "expected %s, found %s", want, kindName(n))
		return
	}
	if v.Kind() == reflect.String {
		v.SetString(n.Value)
		return
	}
	if v.Kind() == reflect.Bool {
		if n.ShortTag() != "!!bool" || n.Decode(v.Addr().Interface()) != nil {
			d.failf(n.Line, path, "%s is not %s", found(n), want)
		}
		return
	}
	if !slices.Contains(tags, n.ShortTag()) || !decodeNumber(n, v) {
		d.failf(n.Line, path, "%s is not %s", found(n), want)
	}
}

// stringList decodes a list of scalars into the []string v, recording the line of each item
// as path[i]. An empty item is an error: "- " alone is more likely a slip than a wish for "".
func (d *decoder) stringList(line int, path string, n *yaml.Node, v reflect.Value) {
	if n.Kind != yaml.SequenceNode {
		d.failf(line, path, "expected a list, found %s", kindName(n))
		return
	}
	items := reflect.MakeSlice(v.Type(), 0, len(n.Content))
	for i, item := range n.Content {
		item = resolve(item)
		at := fmt.Sprintf("%s[%d]", path, i)
		switch {
		case item.Kind != yaml.ScalarNode:
			d.failf(item.Line, path, "item %d: expected a string, found %s", i, kindName(item))
			continue
		case item.ShortTag() == "!!null":
			d.failf(item.Line, path, "item %d is empty", i)
			continue
		}
		d.lines[at] = item.Line
		items = reflect.Append(items, reflect.ValueOf(item.Value).Convert(v.Type().Elem()))
	}
	v.Set(items)
}

// decodeNumber sets v from the numeric scalar n. An integer field takes a float only when it
// is a whole number in range (steps: 1e3 is 1000; 1.5 is an error, where yaml.v3 would
// silently truncate it).
func decodeNumber(n *yaml.Node, v reflect.Value) bool {
	if n.ShortTag() == "!!int" || v.Kind() == reflect.Float64 {
		return n.Decode(v.Addr().Interface()) == nil
	}
	var f float64
	if n.Decode(&f) != nil || f != math.Trunc(f) {
		return false
	}
	switch v.Kind() {
	case reflect.Int:
		if f < math.MinInt64 || f >= math.MaxInt64 || v.OverflowInt(int64(f)) {
			return false
		}
		v.SetInt(int64(f))
	case reflect.Uint64:
		if f < 0 || f >= math.MaxUint64 {
			return false
		}
		v.SetUint(uint64(f))
	}
	return true
}

func lookup(fields []field, name string) (field, bool) {
	for _, f := range fields {
		if f.name == name {
			return f, true
		}
	}
	return field{}, false
}

func names(fields []field) string {
	s := make([]string, len(fields))
	for i, f := range fields {
		s[i] = f.name
	}
	return strings.Join(s, ", ")
}

// resolve follows aliases to the node they name.
func resolve(n *yaml.Node) *yaml.Node {
	for n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	return n
}

// found shows a scalar as the user wrote it: strings quoted, so that "fast" reads as text.
func found(n *yaml.Node) string {
	if n.ShortTag() == "!!str" {
		return strconv.Quote(n.Value)
	}
	return n.Value
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		return fmt.Sprintf("the value %s", found(n))
	}
	return "nothing"
}
