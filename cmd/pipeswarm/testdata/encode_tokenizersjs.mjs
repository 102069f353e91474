// Loads a tokenizer.json in Hugging Face's Tokenizers.js and encodes a text file with it,
// without special tokens. Usage: node encode_tokenizersjs.mjs MODULE_FILE TOKENIZER_JSON TEXT_FILE
// prints {"vocab": n, "ids": [...]}: the vocabulary size and the ids.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [modFile, tokFile, textFile] = process.argv.slice(2);
const { Tokenizer } = await import(pathToFileURL(modFile).href);
const json = JSON.parse(readFileSync(tokFile, "utf8"));
const tok = new Tokenizer(json, { clean_up_tokenization_spaces: false });
const ids = tok.encode(readFileSync(textFile, "utf8"), { add_special_tokens: false }).ids;
// The vocabulary: the model's tokens and the added ones (<|endoftext|> is only the latter).
const vocab = Math.max(...Object.values(json.model.vocab), ...(json.added_tokens ?? []).map((a) => a.id)) + 1;
process.stdout.write(JSON.stringify({ vocab, ids }));
