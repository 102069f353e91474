// Encodes and decodes texts with Hugging Face's Tokenizers.js, for the parity tests.
// Usage: node tokenizersjs.mjs MODULE_FILE TOKENIZER_JSON INPUT_JSON
// INPUT_JSON is {"texts": [...], "bench": "text", "reps": n}; the output is
// {"ids": [[...]], "decoded": [...], "seconds": [...], "cpu_seconds": [...]}: the wall and
// CPU time of each of reps encodings of bench.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [modFile, tokFile, inFile] = process.argv.slice(2);
const { Tokenizer } = await import(pathToFileURL(modFile).href);
const tok = new Tokenizer(JSON.parse(readFileSync(tokFile, "utf8")), { clean_up_tokenization_spaces: false });
const input = JSON.parse(readFileSync(inFile, "utf8"));
const ids = (input.texts ?? []).map((t) => tok.encode(t, { add_special_tokens: false }).ids);
const decoded = ids.map((x) => (x.length ? tok.decode(x, { clean_up_tokenization_spaces: false }) : ""));
const seconds = [];
const cpu_seconds = [];
for (let i = 0; i < (input.reps ?? 0); i++) {
  const t0 = process.hrtime.bigint();
  const c0 = process.cpuUsage();
  tok.encode(input.bench, { add_special_tokens: false });
  const c = process.cpuUsage(c0);
  seconds.push(Number(process.hrtime.bigint() - t0) / 1e9);
  cpu_seconds.push((c.user + c.system) / 1e6);
}
process.stdout.write(JSON.stringify({ ids, decoded, seconds, cpu_seconds }));
