// Drives the TypeScript client generated from /openapi.json (openapi-typescript types for
// openapi-fetch) against a running stack (scripts/generated-clients.sh): list the templates,
// submit both, wait for them, read the JSON and Markdown documents and the event stream, cancel,
// read error bodies. It must type-check against the generated types. FANOUT_URL and
// FANOUT_TOKEN name the API.

import createClient from "openapi-fetch";
import type { components, paths } from "./generated/typescript/schema.js";

type Schemas = components["schemas"];

declare const process: { env: Record<string, string | undefined>; exit(code: number): never };

const client = createClient<paths>({
  baseUrl: process.env.FANOUT_URL,
  headers: { Authorization: `Bearer ${process.env.FANOUT_TOKEN}` },
});

function check(cond: unknown, what: string, detail?: unknown): asserts cond {
  if (!cond) throw new Error(`${what}: ${JSON.stringify(detail)}`);
}

const FINAL: Schemas["ReportStatus"][] = [
  "completed",
  "completed_with_failures",
  "failed",
  "cancelled",
];

async function waitFinal(id: string): Promise<Schemas["ReportView"]> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const { data, error } = await client.GET("/v1/reports/{id}", { params: { path: { id } } });
    check(data, "get report", error);
    if (FINAL.includes(data.status)) return data;
    check(Date.now() < deadline, `${id} still ${data.status}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function submit(body: Schemas["SubmitBody"]): Promise<Schemas["Accepted"]> {
  const { data, error, response } = await client.POST("/v1/reports", { body });
  check(response.status === 202 && data, "submit", error);
  return data;
}

const templates = await client.GET("/v1/templates");
check(templates.data, "templates", templates.error);
const names = templates.data.map((t) => t.name);
check(names.includes("persona-panel") && names.includes("startup-report"), "template names", names);

const panel = await submit({
  template: "persona-panel",
  inputs: {
    content: "A landing page for a stock-taking app for restaurants.",
    personas: [
      { name: "Marta", description: "Owns a tasca" },
      { name: "Tom", description: "Head chef" },
    ],
  },
});
const startup = await submit({
  template: "startup-report",
  inputs: { idea: "Photograph the bin, get tomorrow's order." },
});
check(panel.status === "running" && panel.jobs === 3, "accepted", panel);

for (const accepted of [panel, startup]) {
  const id = accepted.id;
  const view = await waitFinal(id);
  check(view.status === "completed", "status", view.status);
  check(view.totals.done === accepted.jobs, "totals", view.totals);

  const doc = await client.GET("/v1/reports/{id}/report.json", { params: { path: { id } } });
  check(doc.data, "document", doc.error);
  // The document and the view share names and formats (milliseconds).
  check(doc.data.created_at === view.created_at, "created_at", [doc.data.created_at, view.created_at]);
  check(doc.data.finished_at === view.finished_at, "finished_at");
  const sections = [...new Set(view.sections.map((s) => s.section))];
  check(
    JSON.stringify(doc.data.sections.map((s) => s.section)) === JSON.stringify(sections),
    "sections in template order",
    doc.data.sections.map((s) => s.section),
  );

  const md = await client.GET("/v1/reports/{id}/report.md", {
    params: { path: { id } },
    parseAs: "text",
  });
  check(typeof md.data === "string" && md.data.startsWith("# "), "markdown", md.data);
  check(md.response.headers.get("content-type")?.startsWith("text/markdown"), "markdown type");

  const events = await client.GET("/v1/reports/{id}/events", {
    params: { path: { id } },
    parseAs: "text",
  });
  check(typeof events.data === "string" && events.data.includes("event: report\n"), "events");
}

const doc = await client.GET("/v1/reports/{id}/report.json", { params: { path: { id: panel.id } } });
check(doc.data, "panel document", doc.error);
for (const s of doc.data.sections) {
  if (s.for_each) {
    check(s.items_total === 2, "items", s);
    check(s.items.map((i) => i.item).join() === "Marta,Tom", "items in input order", s.items);
    check(s.items.map((i) => i.index).join() === "0,1", "item indexes", s.items);
  } else {
    check(s.section === "summary" && !!s.text, "summary", s);
  }
}

// Cancel a report while it runs.
const running = await submit({ template: "startup-report", inputs: { idea: "Cancel me." } });
const cancelled = await client.DELETE("/v1/reports/{id}", { params: { path: { id: running.id } } });
check(cancelled.response.status === 202 && cancelled.data, "cancel", cancelled.error);
check((await waitFinal(running.id)).status === "cancelled", "cancelled");

// Error bodies.
const conflict = await client.DELETE("/v1/reports/{id}", { params: { path: { id: panel.id } } });
check(conflict.response.status === 409 && conflict.error?.error.code === "conflict", "409", conflict.error);
const missing = await client.GET("/v1/reports/{id}", { params: { path: { id: "no-such-report" } } });
check(missing.response.status === 404 && missing.error?.error.code === "not_found", "404", missing.error);

console.log("typescript client: ok");
