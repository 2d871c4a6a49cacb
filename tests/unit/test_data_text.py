"""Text sources: the Wikipedia split and cleaner, .txt/.jsonl loading, token windows."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from accullm_export import packaged_files
from accullm_export.data import text as text_module
from accullm_export.data import wikipedia as wikipedia_module
from accullm_export.data.text import load_text_source, token_windows
from accullm_export.data.wikipedia import clean_wikitext, split_of, wikipedia_pages, wikipedia_titles
from accullm_export.errors import UserError


def char_encode(text: str) -> list[int]:
    return [ord(character) % 256 for character in text]


@pytest.fixture(scope="module")
def wiki_available() -> None:
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("the built-in Wikipedia extract needs gensim: pip install --no-deps gensim")


# --- Wikipedia -----------------------------------------------------------------------------------------------

def test_split_rule_is_every_fifth_article() -> None:
    assert [split_of(index) for index in range(10)] == ["calibration"] * 4 + ["evaluation"] + \
        ["calibration"] * 4 + ["evaluation"]


def test_wikipedia_splits_are_disjoint_and_cover_all(wiki_available) -> None:
    calibration, evaluation, everything = (wikipedia_titles(split) for split in ("calibration", "evaluation", "all"))
    assert calibration and evaluation
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation) == sorted(everything)
    assert len(set(everything)) == len(everything)
    assert 0.1 < len(evaluation) / len(everything) < 0.3


def test_wikipedia_split_is_deterministic(wiki_available) -> None:
    first = wikipedia_titles("evaluation")
    wikipedia_module._parsed_dump.cache_clear()  # parse the dump again rather than reuse the cached pages
    assert wikipedia_titles("evaluation") == first


def test_wikipedia_text_is_clean_prose(wiki_available) -> None:
    pages = wikipedia_pages("all")
    for page in pages:
        for markup in ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "'''", "<!--"):
            assert markup not in page.text, (page.title, markup)
        assert "\n\n\n" not in page.text
        assert len(page.text) >= 500
    assert sum(len(page.text) for page in pages) > 1_000_000


def test_wikipedia_unknown_split_is_a_user_error(wiki_available) -> None:
    with pytest.raises(UserError, match="unknown Wikipedia split"):
        wikipedia_pages("train")


def test_clean_wikitext_on_handwritten_markup() -> None:
    wikitext = (
        "{{Infobox person|name={{nowrap|Ada}}|born=1815}}\n"
        "'''Ada''' was a [[mathematician]] and [[Writer|writer]].<ref name=\"a\">Some {{cite|x}} book</ref>"
        "<ref name=\"b\"/> She wrote<!-- hidden --> notes.\n"
        "[[File:Ada.jpg|thumb|A [[portrait]] of Ada [about 1840] by Chalon]]\n"
        "{| class=\"wikitable\"\n| cell {{tpl}}\n|}\n"
        "== Early life ==\n\n\n\nShe was born in <small>London</small>.\n"
        "[[Category:Mathematicians]]\n"
        "== References ==\n* a reference list\n"
    )
    assert clean_wikitext(wikitext) == (
        "Ada was a mathematician and writer. She wrote notes.\n\nEarly life\n\nShe was born in London."
    )


def test_clean_wikitext_keeps_unclosed_template_text() -> None:
    assert clean_wikitext("before {{broken and after") == "before broken and after"


# --- files ---------------------------------------------------------------------------------------------------

def test_wiki_specs(wiki_available) -> None:
    default, evaluation, calibration = (load_text_source(spec) for spec in ("wiki", "wiki:evaluation",
                                                                            "wiki:calibration"))
    assert default == evaluation
    assert evaluation.description["split"] == "evaluation"
    assert evaluation.description["pages"] == list(wikipedia_titles("evaluation"))
    assert not set(evaluation.documents) & set(calibration.documents)


def test_unknown_wiki_split_spec() -> None:
    with pytest.raises(UserError, match="unknown Wikipedia split"):
        load_text_source("wiki:train")


def test_txt_documents_split_on_blank_lines(tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nstill first\n\n  \nsecond\n\n\n\nthird\n", encoding="utf-8")
    source = load_text_source(str(path))
    assert source.documents == ("first line\nstill first", "second", "third")
    assert source.description["kind"] == "file" and source.description["format"] == "txt"
    assert len(source.description["sha256"]) == 64


def test_txt_without_blank_lines_is_one_document(tmp_path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("a\nb\nc", encoding="utf-8")
    assert load_text_source(str(path)).documents == ("a\nb\nc",)


def test_jsonl_documents(tmp_path) -> None:
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": "alpha", "id": 1}), "", json.dumps({"text": "  "}), json.dumps({"text": "beta"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = load_text_source(str(path))
    assert source.documents == ("alpha", "beta")
    assert source.description["format"] == "jsonl"


@pytest.mark.parametrize("bad_line", ["{not json", json.dumps({"body": "x"}), json.dumps(["text"]),
                                      json.dumps({"text": 3})])
def test_bad_jsonl_line_names_its_number(tmp_path, bad_line) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 3"):
        load_text_source(str(path))


@pytest.mark.parametrize(("name", "content"), [("empty.txt", ""), ("blank.txt", "\n  \n\n"),
                                               ("empty.jsonl", json.dumps({"text": ""}) + "\n")])
def test_empty_source(tmp_path, name, content) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match="empty text source"):
        load_text_source(str(path))


def test_missing_file(tmp_path) -> None:
    with pytest.raises(UserError, match="no such file"):
        load_text_source(str(tmp_path / "absent.txt"))


def test_unknown_extension(tmp_path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(UserError, match="unknown text source"):
        load_text_source(str(path))


# --- token windows -------------------------------------------------------------------------------------------

_LETTERS = np.random.default_rng(0).integers(97, 123, size=(20, 300))
DOCUMENTS = [f"document number {index}: " + "".join(map(chr, row)) for index, row in enumerate(_LETTERS)]


def test_token_windows_shape_and_dtype() -> None:
    windows = token_windows(DOCUMENTS, char_encode, num_windows=5, seq_len=64)
    assert windows.shape == (5, 64)
    assert windows.dtype == np.int64


def test_token_windows_are_windows_of_the_stream() -> None:
    windows = token_windows(DOCUMENTS[:2], char_encode, num_windows=3, seq_len=16, separator_ids=[999])
    stream = char_encode(DOCUMENTS[0]) + [999] + char_encode(DOCUMENTS[1])
    starts = [next(start for start in range(0, len(stream) - 15, 16) if stream[start:start + 16] == list(row))
              for row in windows]
    assert starts == sorted(starts) and len(set(starts)) == 3


def test_token_windows_separator_between_documents() -> None:
    windows = token_windows(["ab", "cd"], char_encode, num_windows=1, seq_len=5, separator_ids=[7])
    np.testing.assert_array_equal(windows, [[97, 98, 7, 99, 100]])


def test_token_windows_deterministic_with_seed() -> None:
    first = token_windows(DOCUMENTS, char_encode, num_windows=6, seq_len=32, seed=3)
    again = token_windows(DOCUMENTS, char_encode, num_windows=6, seq_len=32, seed=3)
    other = token_windows(DOCUMENTS, char_encode, num_windows=6, seq_len=32, seed=4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_token_windows_differ_from_each_other() -> None:
    windows = token_windows(DOCUMENTS, char_encode, num_windows=8, seq_len=32)
    assert len({row.tobytes() for row in windows}) == 8


def test_token_windows_too_short_corpus() -> None:
    with pytest.raises(UserError, match=r"10 tokens available, 12 needed"):
        token_windows(["0123456789"], char_encode, num_windows=3, seq_len=4)


def test_token_windows_exact_fit_needs_no_draw() -> None:
    windows = token_windows(["abcdefgh"], char_encode, num_windows=2, seq_len=4)
    np.testing.assert_array_equal(windows, [char_encode("abcd"), char_encode("efgh")])


@pytest.mark.parametrize(("num_windows", "seq_len"), [(0, 8), (2, 1)])
def test_token_windows_validates_sizes(num_windows, seq_len) -> None:
    with pytest.raises(UserError, match="at least"):
        token_windows(DOCUMENTS, char_encode, num_windows=num_windows, seq_len=seq_len)


def test_token_windows_stops_tokenizing_early() -> None:
    encoded = []

    def counting_encode(document: str) -> list[int]:
        encoded.append(document)
        return char_encode(document)

    token_windows(DOCUMENTS, counting_encode, num_windows=1, seq_len=64)
    budget = text_module.TOKEN_BUDGET_FACTOR * 64
    assert len(encoded) == -(-budget // len(char_encode(DOCUMENTS[0])))


def test_missing_gensim_is_a_user_error_with_the_install_hint(monkeypatch) -> None:
    monkeypatch.setattr(packaged_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps gensim"):
        load_text_source("wiki")
