// Validates an AsyncAPI document with the official parser: `node validate.mjs FILE`.
// Prints the diagnostics as JSON on stdout; exits 1 when the document has an error.
import { Parser } from "@asyncapi/parser";
import { readFileSync } from "node:fs";

const parser = new Parser();
const { document, diagnostics } = await parser.parse(readFileSync(process.argv[2], "utf8"));
const report = diagnostics.map((d) => ({
  severity: d.severity, // 0 error, 1 warning, 2 information, 3 hint
  code: d.code,
  message: d.message,
  path: d.path,
}));
process.stdout.write(JSON.stringify(report) + "\n");
process.exit(document && !report.some((d) => d.severity === 0) ? 0 : 1);
