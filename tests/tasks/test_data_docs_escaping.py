"""Data Docs of a batch whose values hold HTML: the pages show the values as text, the report keeps them raw."""
from __future__ import annotations

import pandas as pd
import pytest

from tasks.expectations import ephemeral_context, expectation_types, run_suites, suite

SCRIPT, IMG, AMP = "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "a<b & c"


@pytest.mark.fault("security", "a batch value (a category, a users.csv gender) holding HTML such as "
                               "<img src=x onerror=alert(1)>",
                   "the Data Docs pages show it escaped, as text; the JSON report keeps it raw (before: written into "
                   "the page as it was, script run when an engineer opened a refused batch's page)")
def test_data_docs_show_html_in_the_data_as_text(tmp_path):
    """Before: GE 1.x wrote the unexpected values table and the observed value into the page unescaped, so a CSV
    value ``<img src=x onerror=alert(1)>`` ran as script in the Data Docs of the batch that held it."""
    E = expectation_types()
    context, docs = ephemeral_context(), tmp_path / "docs"
    frame = pd.DataFrame({"category": ["pos", "neg", SCRIPT, IMG, IMG, AMP]})
    report = run_suites(context, "batch", [(suite("contract", [
        E.ExpectColumnValuesToBeInSet(column="category", value_set=["neg", "pos", "<b>bold</b>"]),
        E.ExpectColumnMostCommonValueToBeInSet(column="category", value_set=["pos"])]), frame)], docs)
    # the report (and failure_message, written from it) keeps the values as they were in the data
    in_set, common = report["checks"]
    assert in_set["unexpected_examples"] == [SCRIPT, IMG, IMG, AMP] and common["observed"] == [IMG]
    # a second validation in the same context renders the site again: the first page is escaped once, not twice
    run_suites(context, "later", [(suite("other", [E.ExpectColumnValuesToBeInSet(column="category",
                                                                               value_set=["pos"])]), frame)], docs)
    pages = {p.relative_to(docs).parts[1]: p.read_text() for p in (docs / "validations").rglob("*.html")}
    assert sorted(pages) == ["contract", "other"]
    for text in [*pages.values(), *(p.read_text() for p in docs.glob("*/*.html")), (docs / "index.html").read_text()]:
        assert "<script>alert(1)" not in text and "<img src=x" not in text and "&amp;lt;" not in text
    page = pages["contract"]
    # the values are still shown, escaped once: in the unexpected values table, and as the observed value
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a&lt;b &amp; c" in page
    assert "['&lt;img src=x onerror=alert(1)&gt;']" in page
    # a value_set entry: GE escapes an expectation's kwargs itself (left alone: escaped twice it showed &lt;b&gt;)
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    # the context's store keeps the raw results (only the rendering saw them escaped)
    store = context.validation_results_store
    stored = [r.result for key in store.list_keys() for r in store.get(key).results]
    assert any(IMG in (r.get("partial_unexpected_list") or []) for r in stored)
