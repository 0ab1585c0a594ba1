"""Drives the Python client that openapi-python-client generates from /openapi.json against a
running stack (scripts/generated-clients.sh): list the templates, submit both, wait for them,
read the JSON and Markdown documents and the event stream, cancel, read error bodies.
FANOUT_URL and FANOUT_TOKEN name the API."""

import os
import time

from fanout_api_client import AuthenticatedClient
from fanout_api_client.api.reports import (
    cancel_report,
    get_report,
    get_report_document,
    get_report_markdown,
    report_events,
    submit_report,
)
from fanout_api_client.api.templates import list_templates
from fanout_api_client.models import (
    Accepted,
    ErrorBody,
    ForEachSection,
    JobSection,
    PersonaPanelInputs,
    PersonaPanelInputsPersonasItem,
    ReportDocument,
    ReportRef,
    ReportStatus,
    ReportView,
    StartupReportInputs,
    SubmitPersonaPanel,
    SubmitStartupReport,
)

FINAL = {
    ReportStatus.COMPLETED,
    ReportStatus.COMPLETED_WITH_FAILURES,
    ReportStatus.FAILED,
    ReportStatus.CANCELLED,
}

client = AuthenticatedClient(
    base_url=os.environ["FANOUT_URL"], token=os.environ["FANOUT_TOKEN"], timeout=30.0
)


def wait_final(report_id: str) -> ReportView:
    deadline = time.monotonic() + 60
    while True:
        view = get_report.sync(client=client, id=report_id)
        assert isinstance(view, ReportView), view
        if view.status in FINAL:
            return view
        assert time.monotonic() < deadline, f"{report_id} still {view.status}"
        time.sleep(0.2)


def submit(body) -> Accepted:
    resp = submit_report.sync_detailed(client=client, body=body)
    assert resp.status_code == 202, (resp.status_code, resp.content)
    assert isinstance(resp.parsed, Accepted), resp.parsed
    return resp.parsed


templates = list_templates.sync(client=client)
assert isinstance(templates, list), templates
names = {t.name for t in templates}
assert {"persona-panel", "startup-report"} <= names, names

panel = submit(
    SubmitPersonaPanel(
        template="persona-panel",
        inputs=PersonaPanelInputs(
            content="A landing page for a stock-taking app for restaurants.",
            personas=[
                PersonaPanelInputsPersonasItem(name="Marta", description="Owns a tasca"),
                PersonaPanelInputsPersonasItem(name="Tom", description="Head chef"),
            ],
        ),
    )
)
startup = submit(
    SubmitStartupReport(
        template="startup-report",
        inputs=StartupReportInputs(idea="Photograph the bin, get tomorrow's order."),
    )
)
assert panel.status == ReportStatus.RUNNING and panel.jobs == 3, panel

for accepted in (panel, startup):
    view = wait_final(accepted.id)
    assert view.status == ReportStatus.COMPLETED, view.status
    assert view.totals.done == view.totals.sections == accepted.jobs

    doc = get_report_document.sync(client=client, id=accepted.id)
    assert isinstance(doc, ReportDocument), doc
    assert doc.id == view.id and doc.status == view.status
    # The document and the view share names and formats (milliseconds).
    assert doc.created_at == view.created_at and doc.finished_at == view.finished_at
    assert [s.section for s in doc.sections] == list(
        dict.fromkeys(s.section for s in view.sections)
    )

    md = get_report_markdown.sync(client=client, id=accepted.id)
    assert isinstance(md, str) and md.startswith("# "), md

    events = report_events.sync(client=client, id=accepted.id)
    assert isinstance(events, str) and "event: report\n" in events, events

doc = get_report_document.sync(client=client, id=panel.id)
personas = [s for s in doc.sections if isinstance(s, ForEachSection)]
assert len(personas) == 1 and personas[0].items_total == 2, doc.sections
assert [i.item for i in personas[0].items] == ["Marta", "Tom"]
assert [i.index for i in personas[0].items] == [0, 1]
summary = [s for s in doc.sections if isinstance(s, JobSection)]
assert summary and summary[0].text, summary

# Cancel a report while it runs.
running = submit(
    SubmitStartupReport(template="startup-report", inputs=StartupReportInputs(idea="Cancel me."))
)
cancelled = cancel_report.sync(client=client, id=running.id)
assert isinstance(cancelled, ReportRef), cancelled
assert wait_final(running.id).status == ReportStatus.CANCELLED

# Error bodies.
resp = cancel_report.sync_detailed(client=client, id=panel.id)
assert resp.status_code == 409 and isinstance(resp.parsed, ErrorBody), resp
assert resp.parsed.error.code == "conflict", resp.parsed
resp = get_report.sync_detailed(client=client, id="no-such-report")
assert resp.status_code == 404 and isinstance(resp.parsed, ErrorBody), resp
assert resp.parsed.error.code == "not_found", resp.parsed

print("python client: ok")
