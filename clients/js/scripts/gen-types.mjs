// Generates src/messages.gen.ts from the server's committed JSON Schema (PROTOCOL.md §5).
// `--check` regenerates in memory and exits 1 when the committed file differs, so the client's
// types cannot drift from the server's messages. Never edit messages.gen.ts by hand.
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { compile } from 'json-schema-to-typescript';

const here = dirname(fileURLToPath(import.meta.url));
export const SCHEMA = resolve(here, '../../../protocol/schema/messages.schema.json');
export const OUTPUT = resolve(here, '../src/messages.gen.ts');

const BANNER = `/* eslint-disable */
/**
 * The messages of PROTOCOL.md §1, generated from protocol/schema/messages.schema.json by
 * scripts/gen-types.mjs (json-schema-to-typescript). Do not edit: run \`npm run gen\`.
 */`;

// Property-level titles ("Id", "Seq", ...) would each become a type alias (Id1, Id2, ...): only
// the titles of named definitions carry meaning, so drop the others before compiling.
function stripTitles(node, keep) {
  if (Array.isArray(node)) return node.map((item) => stripTitles(item, false));
  if (node === null || typeof node !== 'object') return node;
  const out = {};
  for (const [key, value] of Object.entries(node)) {
    if (key === 'title' && !keep) continue;
    if (key === '$defs' || key === 'definitions') {
      out[key] = Object.fromEntries(
        Object.entries(value).map(([name, def]) => [name, stripTitles(def, true)]),
      );
    } else {
      out[key] = stripTitles(value, false);
    }
  }
  return out;
}

export async function generate(schemaPath = SCHEMA) {
  const schema = JSON.parse(readFileSync(schemaPath, 'utf8'));
  return compile(stripTitles(schema, true), schema.title ?? 'SluiceMessages', {
    bannerComment: BANNER,
    unreachableDefinitions: true,
    additionalProperties: false,
    maxItems: -1,
    format: true,
    style: { singleQuote: true, printWidth: 110 },
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const schemaArg = process.argv.find((arg) => arg.startsWith('--schema='));
  const text = await generate(schemaArg ? resolve(schemaArg.slice(9)) : SCHEMA);
  if (process.argv.includes('--check')) {
    const committed = readFileSync(OUTPUT, 'utf8');
    if (committed !== text) {
      console.error('src/messages.gen.ts differs from the schema: run `npm run gen` and commit it');
      process.exit(1);
    }
  } else {
    writeFileSync(OUTPUT, text);
  }
}
