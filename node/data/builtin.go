package data

import (
	"bytes"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
)

// BuiltinName names the built-in corpus in run records. Bump the version whenever the
// generated text changes, so that runs on different texts are never compared as equal.
const BuiltinName = "builtin:synthetic-english-v1"

// builtinSize is the length the generator aims for; it stops at the first chapter break
// past it, a little over 2 MiB.
const builtinSize = 2 << 20

var builtin = sync.OnceValue(generate)

// Builtin returns the built-in corpus and its name. The text is generated in code, the same
// on every machine, so a run needs no download: about 2 MB of simple English-like stories
// with recurring characters, dialogue, chapters and wrapped lines, enough structure for a
// byte-level model's loss to fall far below uniform. The slice is the caller's own.
func Builtin() (text []byte, name string) {
	return bytes.Clone(builtin()), BuiltinName
}

// The word lists are ordered roughly by how often they should appear: pick favours the
// front, which gives the text a Zipf-like skew like real prose.
var (
	women   = []string{"Anna", "Mara", "Lucy", "Elena", "Ruth", "Nora", "Iris", "Clara", "Hana", "June", "Vera", "Alice"}
	men     = []string{"Tom", "Ben", "Oscar", "Hugo", "Leo", "Sam", "Felix", "Victor", "Paul", "Jonah", "Karl", "Milo"}
	things  = []string{"key", "letter", "lamp", "coat", "book", "map", "box", "cup", "bell", "rope", "coin", "basket", "candle", "clock", "ring", "bag", "hat", "bottle", "loaf", "apple", "stone", "feather", "mirror", "ticket", "knife", "drum", "kettle", "pen", "spoon", "blanket", "jar", "egg", "shell", "scarf", "umbrella", "violin", "anchor", "envelope", "owl", "ink"}
	places  = []string{"market", "river", "mill", "garden", "harbour", "station", "kitchen", "library", "forest", "bridge", "church", "school", "tower", "farm", "inn", "square", "hill", "shore", "village", "field", "cellar", "orchard", "lake", "attic"}
	adjs    = []string{"old", "small", "red", "heavy", "quiet", "bright", "broken", "green", "warm", "cold", "empty", "strange", "little", "dark", "wooden", "silver", "blue", "long", "clean", "round", "soft", "tall", "new", "yellow", "wet", "golden", "hidden", "narrow", "white", "black", "odd", "ancient", "icy", "open"}
	verbsT  = []string{"found", "lost", "carried", "opened", "closed", "painted", "mended", "dropped", "washed", "hid", "bought", "sold", "took", "held", "cleaned", "filled", "counted", "kept", "watched", "brought", "pushed", "lifted", "wrapped", "noticed", "forgot", "buried"}
	verbsI  = []string{"laughed", "waited", "slept", "smiled", "sang", "ran", "sat down", "stood up", "walked home", "listened", "hurried", "nodded", "sighed", "whistled", "shivered", "stopped", "wept", "danced"}
	adverbs = []string{"slowly", "quickly", "quietly", "carefully", "softly", "again", "at once", "for a while", "without a word", "happily", "sadly", "all day"}
	times   = []string{"in the morning", "at noon", "in the evening", "at night", "after supper", "before dawn", "on Sunday", "on Monday", "the next day", "an hour later", "that winter", "in the spring"}
	preps   = []string{"near", "in", "by", "behind", "beside", "under", "above", "outside"}
	weather = []string{"rain", "wind", "snow", "fog", "storm", "frost"}
	says    = []string{"said", "replied", "whispered", "called", "answered"}
	airs    = []string{"cold", "warm", "wet", "dark", "bright", "quiet", "grey", "still"}
)

// Narration templates. {S} is the scene's subject (a name, or a pronoun once introduced)
// and {Sn} always its name, {O} the other character and {O2} their pronoun, {his} the
// subject's possessive, {T} the scene's object, {P} its place; {np} is "a/an [adjective]
// thing", {n} a thing, {a} an adjective, {place} any place, {vt}/{vi} verbs, {adv} an
// adverb, {time} a time ({Time2} capitalised), {at} a preposition, {w} a kind of weather,
// {air} how the air was, {say} a verb of speech.
var narration = []string{
	"{S} {vt} {np} {at} {P}.",
	"{S} {vi} {adv}.",
	"{time}, {S} went to {P}.",
	"{S} gave {O} {np}.",
	"{S} and {O} {vi} together.",
	"{S} put {his} {n} {at} {T}.",
	"{T} was {a} and {a}.",
	"there was {np} {at} {P}.",
	"{S} looked at {O} and {vi}.",
	"{S} could not find {his} {n}.",
	"{time} the {w} came, and {S} stayed {at} {P}.",
	"when {S} {vi}, {O} {vi} too.",
	"{S} {vt} {T} {adv}.",
	"it was {air} {time}.",
	"{S} thought about {T} for a long time.",
	"{O} had {vt} {T} {time}.",
	"{S} walked from {P} to the {place}, carrying {T}.",
}

// Dialogue: each exchange is a question from the subject and an answer from the other.
var questions = []string{
	`"Where is {T}?" asked {Sn}.`,
	`"Have you seen my {n}?" {Sn} asked.`,
	`"Why is {T} so {a}?" asked {Sn}.`,
	`"Did you go to {P} {time}?" {Sn} asked {O}.`,
}

var answers = []string{
	`"It is {at} {P}," {say} {O}.`,
	`"I {vt} it {time}," {say} {O}.`,
	`"No," said {O}. "But I saw {np} {at} {P}."`,
	`"I do not know," {say} {O}, and {O2} {vi}.`,
	`"Yes," said {O}. "{Time2}, the {w} was {air}."`,
}

// gen writes the corpus from a PCG stream, drawing every choice through below so that the
// text depends on nothing but the seed.
type gen struct {
	rng *rand.PCG
	out []byte

	// The current scene.
	subj, other       string
	subjHe, otherHe   bool
	introduced        bool
	topic, place, adj string
}

func generate() []byte {
	g := &gen{rng: rand.NewPCG(0x5eed, 0xc0ffee), out: make([]byte, 0, builtinSize+64<<10)}
	for chapter := 1; len(g.out) < builtinSize; chapter++ {
		title := capitalise(g.pick(adjs)) + " " + capitalise(g.pick(things))
		g.out = append(g.out, "Chapter "+strconv.Itoa(chapter)+": The "+title+"\n\n"...)
		for range 8 + g.n(8) {
			g.scene()
		}
		g.out = append(g.out, '\n')
	}
	return g.out
}

func (g *gen) scene() {
	g.subj, g.subjHe = g.character()
	for g.other, g.otherHe = g.character(); g.other == g.subj; g.other, g.otherHe = g.character() {
	}
	g.introduced = false
	g.topic, g.place, g.adj = g.pick(things), g.pick(places), g.pick(adjs)

	var para []string
	for range 3 + g.n(5) {
		para = append(para, g.expand(narration[g.n(len(narration))]))
		g.introduced = true
	}
	g.paragraph(para)
	for range g.n(3) {
		g.paragraph([]string{g.expand(questions[g.n(len(questions))])})
		g.paragraph([]string{g.expand(answers[g.n(len(answers))])})
	}
}

func (g *gen) character() (string, bool) {
	if g.n(2) == 0 {
		return g.pick(women), false
	}
	return g.pick(men), true
}

// paragraph writes sentences as one paragraph wrapped at 72 columns, then a blank line.
func (g *gen) paragraph(sentences []string) {
	col := 0
	for _, s := range sentences {
		for _, w := range strings.Fields(s) {
			switch {
			case col == 0:
			case col+1+len(w) > 72:
				g.out = append(g.out, '\n')
				col = 0
			default:
				g.out = append(g.out, ' ')
				col++
			}
			g.out = append(g.out, w...)
			col += len(w)
		}
	}
	g.out = append(g.out, "\n\n"...)
}

// expand fills a template and capitalises the sentence.
func (g *gen) expand(tmpl string) string {
	var b strings.Builder
	for {
		i := strings.IndexByte(tmpl, '{')
		if i < 0 {
			b.WriteString(tmpl)
			break
		}
		j := strings.IndexByte(tmpl, '}')
		b.WriteString(tmpl[:i])
		b.WriteString(g.slot(tmpl[i+1 : j]))
		tmpl = tmpl[j+1:]
	}
	return capitalise(b.String())
}

func (g *gen) slot(name string) string {
	switch name {
	case "S": // the subject, as a pronoun half the time once the reader knows who it is
		if g.introduced && g.n(2) == 0 {
			return pick2(g.subjHe, "he", "she")
		}
		return g.subj
	case "Sn":
		return g.subj
	case "O":
		return g.other
	case "O2":
		return pick2(g.otherHe, "he", "she")
	case "his":
		return pick2(g.subjHe, "his", "her")
	case "T":
		return "the " + g.adj + " " + g.topic
	case "P":
		return "the " + g.place
	case "place":
		return g.pick(places)
	case "np":
		n := g.pick(things)
		if g.n(2) == 0 {
			n = g.pick(adjs) + " " + n
		}
		return article(n) + " " + n
	case "n":
		return g.pick(things)
	case "a":
		return g.pick(adjs)
	case "vt":
		return g.pick(verbsT)
	case "vi":
		return g.pick(verbsI)
	case "adv":
		return g.pick(adverbs)
	case "time":
		return g.pick(times)
	case "Time2":
		return capitalise(g.pick(times))
	case "at":
		return g.pick(preps)
	case "air":
		return g.pick(airs)
	case "w":
		return g.pick(weather)
	case "say":
		return g.pick(says)
	}
	panic("data: builtin template has unknown slot {" + name + "}")
}

// n returns a number in [0, k).
func (g *gen) n(k int) int { return int(below(g.rng, uint64(k))) }

// pick favours the front of the list: the smaller of two uniform draws.
func (g *gen) pick(list []string) string {
	return list[min(g.n(len(list)), g.n(len(list)))]
}

func pick2(first bool, a, b string) string {
	if first {
		return a
	}
	return b
}

func article(np string) string {
	if strings.ContainsRune("aeiou", rune(np[0])) {
		return "an"
	}
	return "a"
}

// capitalise upper-cases the first letter, looking past an opening quote.
func capitalise(s string) string {
	i := 0
	if strings.HasPrefix(s, `"`) {
		i = 1
	}
	if i < len(s) && s[i] >= 'a' && s[i] <= 'z' {
		return s[:i] + string(s[i]-'a'+'A') + s[i+1:]
	}
	return s
}
