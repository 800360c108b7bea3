"""Answer extraction and metrics (tasks/filters.py) against lm-eval 0.4's own filter classes and
exact_match on awkward strings; SQuAD F1 against the SQuAD script's copy in lm-eval (qasper); the
template sandbox (tasks/generative.py render)."""
from __future__ import annotations

import pytest

from tasks import filters
from tasks.base import TaskError
from tasks.generative import render

pytest.importorskip("lm_eval")


# --- filters and metrics equal lm-eval's ------------------------------------------------------------

ANSWERS = ["The answer is 1,234.5.\n#### 1,234.5", "#### -7 and then #### 8", "no number here", "",
           "costs $1,000. Then 3 more\n", "  #### 42  ", "x = 5, y = .5, z = -0.25.", "#### 12abc", "9"]
REGEXES = [(r"#### (\-?[0-9\.\,]+)", 0), (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1), (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", 0),
           (r"The answer is (\-?[0-9\.\,]+).", 0), (r"(\d)(x)?", 0)]


@pytest.mark.parametrize("pattern,group", REGEXES)
def test_regex_filter_equals_lm_evals(pattern, group):
    from lm_eval.filters.extraction import RegexFilter
    theirs = RegexFilter(regex_pattern=pattern, group_select=group).apply([ANSWERS], None)[0]
    assert filters.regex_filter(pattern, group)(ANSWERS) == theirs


def test_other_filters_and_chains_equal_lm_evals():
    from lm_eval.filters.extraction import WhitespaceFilter
    from lm_eval.filters.selection import MajorityVoteFilter, TakeFirstFilter
    from lm_eval.filters.transformation import LowercaseFilter
    votes = [["b", "a", "a", "b", "c"], ["x"], [" A ", "a", " A "]]
    assert [filters.majority_vote(v) for v in votes] == list(MajorityVoteFilter().apply(votes, None))
    assert [filters.FILTERS["take_first"]()(v) for v in votes] == list(TakeFirstFilter().apply(votes, None))
    assert [filters.FILTERS["remove_whitespace"]()(v) for v in votes] == WhitespaceFilter().apply(votes, None)
    assert [filters.FILTERS["lowercase"]()(v) for v in votes] == LowercaseFilter().apply(votes, None)
    vote = filters.FilterChain("maj", [{"function": "regex", "regex_pattern": r"(\d+)"},
                                       {"function": "majority_vote"}, {"function": "take_first"}])
    assert vote(["3 then 4", "4", "x", "4 or 3"]) == "4"
    assert filters.FilterChain("one", [{"function": "take_first"}, {"function": "lowercase"}])(["AB", "C"]) == "ab"
    assert filters.build_filters(None)[0].name == "none"
    with pytest.raises(TaskError, match="unknown function 'regexp'"):
        filters.FilterChain("bad", [{"function": "regexp"}])
    with pytest.raises(TaskError, match="bad regex_pattern"):
        filters.regex_filter("(")


EM_PAIRS = [("1,234.5", "#### 1234.5"), ("$18", "Janet makes\n#### 18"), ("18.", "#### 18"), ("18.0", "18"),
            ("Paris!", "paris"), ("[invalid]", "#### 3"), ("-3", "#### -3"), ("The CAT", "the cat"), ("4 2", "42"),
            ("", ""), ("a.b.", "a.b")]
EM_OPTIONS = [{}, {"ignore_case": True, "ignore_punctuation": False,
                   "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]},
              {"ignore_case": True, "ignore_punctuation": True}, {"ignore_numbers": True, "regexes_to_ignore": [" "]}]


@pytest.mark.parametrize("options", EM_OPTIONS)
def test_exact_match_equals_lm_evals(options):
    from lm_eval.api.metrics import exact_match_hf_evaluate
    for prediction, gold in EM_PAIRS:
        theirs = exact_match_hf_evaluate(predictions=[prediction], references=[gold], **options)["exact_match"]
        assert filters.exact_match(prediction, gold, **options) == theirs, (prediction, gold)
        assert filters.MetricSpec({"metric": "exact_match", **options})(prediction, gold) == theirs


def test_f1_is_squads_and_contains():
    from lm_eval.tasks.qasper.metrics import f1_abstractive, normalize_answer
    pairs = [("The Eiffel Tower, Paris", "eiffel tower"), ("a b a c", "b a"), ("nothing", "else"),
             ("Answer: 42.", "42"), ("an apple and the pear", "apple pear pear")]
    for prediction, gold in pairs:
        assert filters.squad_normalise(prediction) == normalize_answer(prediction)
        assert filters.f1(prediction, gold) == pytest.approx(f1_abstractive([prediction], [gold]))
    assert filters.f1("", "") == 1.0 and filters.f1("the", "x") == 0.0    # SQuAD v2's rule for no-answers
    assert filters.contains("So it is 42 apples", "42") == 1.0
    assert filters.contains("So it is 4 apples", "42") == 0.0
    assert filters.contains("PARIS.", "paris", ignore_case=True) == 1.0
    with pytest.raises(TaskError, match="unknown options"):
        filters.MetricSpec({"metric": "f1", "ignore_case": True})
    with pytest.raises(TaskError, match="only mean"):
        filters.MetricSpec({"metric": "exact_match", "aggregation": "median"})


def test_templates_are_sandboxed_and_strict():
    assert render("{{answer.split('####')[-1].strip()}}", {"answer": "x\n#### 7 "}) == "7"
    assert render("answer", {"answer": "field value"}) == "field value"
    assert render("{{ q | regex_replace('[0-9]', '#') }}", {"q": "a1b22"}) == "a#b##"
    with pytest.raises(TaskError, match="UndefinedError"):
        render("{{missing}}", {"q": 1})
    with pytest.raises(TaskError, match="SecurityError"):
        render("{{ q.__class__.__mro__ }}", {"q": "x"})
