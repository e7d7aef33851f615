// Parse and validate an AsyncAPI document with the real parser; print its diagnostics and,
// with --dump FILE, the document as JSON (what a YAML reader makes of it), so that the Python
// test can check the hand-written YAML says exactly what the generator meant.
// Usage: node validate.mjs docs/asyncapi.yaml [--dump OUT.json]
import { readFileSync, writeFileSync } from 'node:fs';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';
import yaml from 'js-yaml';

const [path, flag, dumpPath] = process.argv.slice(2);
const text = readFileSync(path, 'utf8');
if (flag === '--dump') {
  writeFileSync(dumpPath, JSON.stringify(yaml.load(text)));
}
const parser = new Parser();
const { document, diagnostics } = await parser.parse(text, { source: path });
const names = Object.fromEntries(Object.entries(DiagnosticSeverity).map(([k, v]) => [v, k]));
for (const d of diagnostics) {
  const where = d.path.join('/');
  console.log(`${names[d.severity]} ${d.code}: ${d.message} at /${where}`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
if (!document || errors.length > 0) {
  console.log(`invalid: ${errors.length} error(s)`);
  process.exit(1);
}
console.log(`valid: AsyncAPI ${document.version()}, ${document.channels().length} channels, ` +
  `${document.operations().length} operations, ${document.messages().length} messages`);
