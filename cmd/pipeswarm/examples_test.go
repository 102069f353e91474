package main

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/pipeswarm/pipeswarm/examples"
	"github.com/pipeswarm/pipeswarm/node/assign"
	"github.com/pipeswarm/pipeswarm/node/train"
)

// Every built-in example is taken by its name alone from a directory that holds no
// examples/; a file of that name there comes first; an unknown name lists the names.
func TestExamplesAreTakenByNameFromAnyDirectory(t *testing.T) {
	t.Chdir(t.TempDir())
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	names := examples.Specs()
	for _, want := range []string{"tiny", "tiny2", "tiny4", "tiny4-k4", "tiny-diloco"} {
		if !strings.Contains(" "+strings.Join(names, " ")+" ", " "+want+" ") {
			t.Errorf("built-in examples %v lack %s", names, want)
		}
	}
	for _, name := range names {
		sp, err := loadSpecOr(examples.Default, []string{name}, "", 0, quiet)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if sp.Name != name {
			t.Errorf("%s: loaded the spec named %q", name, sp.Name)
		}
	}
	sp, err := loadSpecOr(examples.Default, []string{"tiny2"}, "", 0, quiet)
	if err != nil || sp.Pipeline.Stages != 2 || sp.Pipeline.Replicas != 1 {
		t.Errorf("tiny2: %+v, %v; want 2 stages and no replicas", sp.Pipeline, err)
	}

	// A file in the working directory is read before the example of that name.
	own := strings.Replace(testSpec, "name: cli-test", "name: mine", 1)
	if err := os.WriteFile("tiny4", []byte(own), 0o644); err != nil {
		t.Fatal(err)
	}
	if sp, err := loadSpecOr(examples.Default, []string{"tiny4"}, "", 0, quiet); err != nil || sp.Name != "mine" {
		t.Errorf("with a file named tiny4 here: spec %v, %v; want the file", sp, err)
	}

	code, _, stderr := runCLI(t, "train", "tiny5", "--steps", "1")
	if code != 1 || !strings.Contains(stderr, `spec "tiny5": no such file, and no built-in example of that name (built in: `+strings.Join(names, ", ")+")") {
		t.Errorf("train tiny5: exit %d, stderr %q; want a refusal listing the built-in examples", code, stderr)
	}
	// A path to an example that is not there says the name works anywhere.
	code, _, stderr = runCLI(t, "bench", "wan", "--spec", filepath.Join("examples", "tiny4-k4.yaml"))
	if code != 1 || !strings.Contains(stderr, "no such file") || !strings.Contains(stderr, "by its name alone: tiny4-k4") {
		t.Errorf("bench wan --spec examples/tiny4-k4.yaml outside the repository: exit %d, stderr %q; want the name suggested", code, stderr)
	}
	for _, cmd := range [][]string{{"train", "--help"}, {"launch", "--help"}, {"bench", "wan", "--help"}} {
		_, _, stderr := runCLI(t, cmd...)
		if !strings.Contains(stderr, strings.Join(names, ", ")) {
			t.Errorf("%s does not list the built-in examples:\n%s", strings.Join(cmd, " "), stderr)
		}
	}
}

// An example that states its parameter count ("# parameters: 1,028,737,024") states
// the count of the model it describes.
func TestExamplesStateTheirParameterCount(t *testing.T) {
	re := regexp.MustCompile(`(?m)^# parameters: ([0-9,]+)$`)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	stated := 0
	for _, name := range examples.Specs() {
		src, _, err := examples.Spec(name)
		if err != nil {
			t.Fatal(err)
		}
		m := re.FindSubmatch(src)
		if m == nil {
			continue
		}
		stated++
		sp, err := loadSpecOr(examples.Default, []string{name}, "", 0, quiet)
		if err != nil {
			t.Fatal(err)
		}
		want := assign.ParamCount(train.ModelConfig(sp))
		if got := strings.ReplaceAll(string(m[1]), ",", ""); got != strconv.FormatInt(want, 10) {
			t.Errorf("%s.yaml states %s parameters; its model has %d", name, m[1], want)
		}
	}
	if stated < 4 {
		t.Errorf("%d examples state their parameter count, want the presets 25m, 125m, 350m and 1b", stated)
	}
}
