package tokenizer

import (
	"math/rand/v2"
	"strings"
)

// Pieces of the random Unicode corpus: what pre-tokenizer patterns and byte-level merges
// find hard. Every rune is assigned in Unicode 15.0 (Go's tables) so that the classes
// agree with JavaScript's newer ones. U+0085 and U+FEFF are left out: Tokenizers.js's
// ByteLevel pattern uses JavaScript's \s, which differs from Oniguruma's on those two.
var (
	corpusWords = []string{
		"the", "The", "THE", "cat", "don't", "I'M", "we'LL", "they're", "you've", "he'd", "it's",
		"'s", "'T", "naïve", "café", "Straße", "ἀλήθεια", "Москва", "שלום", "مرحبا", "हिन्दी",
		"漢字", "東京都", "日本語のテキスト", "한국어", "ไทย", "e\u0301", "\u0301\u0302x", "Zalgo\u0336\u0337",
		"ſ", "K", "ǅ", "ﬁ", "x²", "¼", "Ⅻ", "٣٤٥", "१२३", "１２３４", "3.14159", "1,000,000",
		"12345678901234567890", "0x1F", "😀", "👍🏽", "👨\u200d👩\u200d👧", "❤\ufe0f", "🇫🇷", "🫠",
		"...", "!?", "—", "«»", "“quoted”", "<|endoftext|>", "<|begin_of_text|>", "<|end", "$$", "@#%^&*",
		"\\n", "http://example.com/a?b=c", "a_b", "foo.bar()", "ÿ", "\u00ad", "\u200b", "\x7f", "\x01",
	}
	corpusSpaces = []string{
		" ", " ", " ", "  ", "    ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", " \n", "\n ", " \n\n  ",
		"\r\n", "\r", "\u00a0", "\u3000", "\u2003", "\u2028", "\u2029", "\u202f", "\v", "\f",
		strings.Repeat(" ", 40), strings.Repeat("\n", 17), strings.Repeat(" \t", 9),
	}
)

// randomText returns n pieces of random Unicode text from rng.
func randomText(rng *rand.Rand, n int) string {
	var b strings.Builder
	for range n {
		switch rng.IntN(10) {
		case 0:
			// A random rune from a block of assigned characters.
			blocks := [][2]rune{{0x20, 0x7e}, {0xa1, 0x24f}, {0x370, 0x3ff}, {0x400, 0x4ff}, {0x4e00, 0x9fa5},
				{0x3041, 0x3096}, {0xac00, 0xd7a3}, {0x1f600, 0x1f64f}, {0x300, 0x36f}, {0x2000, 0x206f}}
			bl := blocks[rng.IntN(len(blocks))]
			for range 1 + rng.IntN(4) {
				b.WriteRune(bl[0] + rune(rng.IntN(int(bl[1]-bl[0]+1))))
			}
		case 1, 2, 3:
			b.WriteString(corpusSpaces[rng.IntN(len(corpusSpaces))])
		default:
			b.WriteString(corpusWords[rng.IntN(len(corpusWords))])
			if rng.IntN(3) == 0 {
				b.WriteString(" ")
			}
		}
	}
	return b.String()
}

// randomCorpus returns count texts of up to size pieces each, seeded.
func randomCorpus(seed uint64, count, size int) []string {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	out := make([]string, count)
	for i := range out {
		out[i] = randomText(rng, 1+rng.IntN(size))
	}
	return out
}
