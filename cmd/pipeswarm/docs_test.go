package main

import (
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// userDocs are the documents a user's clone holds: the README and docs/*.md, as paths
// from the repository root.
func userDocs(t *testing.T) []string {
	t.Helper()
	docs, err := filepath.Glob("../../docs/*.md")
	if err != nil {
		t.Fatal(err)
	}
	if len(docs) == 0 {
		t.Fatal("no docs/*.md beside the README")
	}
	return append([]string{"../../README.md"}, docs...)
}

// A user's clone has only the repository: no document points at anything outside it.
func TestDocsReferNothingOutsideTheRepository(t *testing.T) {
	for _, doc := range userDocs(t) {
		b, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		for i, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, "../shared") {
				t.Errorf("%s:%d refers outside the repository: %s", doc, i+1, line)
			}
		}
	}
}

// mdLink is an inline markdown link or image: [text](target) or ![alt](target).
var mdLink = regexp.MustCompile(`\]\(([^()\s]+)\)`)

// Every relative link between the README and docs/ names a file in the repository
// (anchors are not checked: headings move more often than files).
func TestDocsLinksResolve(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	links := 0
	for _, doc := range userDocs(t) {
		b, err := os.ReadFile(doc)
		if err != nil {
			t.Fatal(err)
		}
		for i, line := range strings.Split(string(b), "\n") {
			for _, m := range mdLink.FindAllStringSubmatch(line, -1) {
				target := m[1]
				u, err := url.Parse(target)
				if err != nil {
					t.Errorf("%s:%d: link %q does not parse: %v", doc, i+1, target, err)
					continue
				}
				if u.Scheme != "" || u.Host != "" || u.Path == "" {
					continue // a web address, or an anchor in the same file
				}
				links++
				path := filepath.Join(filepath.Dir(doc), filepath.FromSlash(u.Path))
				abs, err := filepath.Abs(path)
				if err != nil {
					t.Fatal(err)
				}
				if rel, err := filepath.Rel(root, abs); err != nil || strings.HasPrefix(rel, "..") {
					t.Errorf("%s:%d: link %q leaves the repository", doc, i+1, target)
					continue
				}
				if _, err := os.Stat(abs); err != nil {
					t.Errorf("%s:%d: link %q names no file: %v", doc, i+1, target, err)
				}
			}
		}
	}
	if links == 0 {
		t.Error("no relative links found: the README should point at docs/")
	}
}
