import csv
import json

import pytest

from pmrlhf.config import DataConfig
from pmrlhf.data import DataError, load_records, split_indices
from pmrlhf.data.records import Comparison, Demonstration, Prompt, Ranking
from pmrlhf.data.sources import holdout


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


HH = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Suggest a drink\n\nAssistant: Tea, perhaps.",
    "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Suggest a drink\n\nAssistant: No.",
}


def test_hh_rlhf_dialogues_split_into_prompt_and_final_turns(tmp_path):
    src = write_jsonl(tmp_path / "hh.jsonl", [HH])
    (rec,), _ = load_records(DataConfig(source=src, format="hh_rlhf"), "comparison")
    assert rec == Comparison(
        "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Suggest a drink\n\nAssistant:", " Tea, perhaps.", " No."
    )
    # auto-detection picks the same converter; the demonstration is the chosen turn
    (demo,), _ = load_records(DataConfig(source=src), "demonstration")
    assert demo == Demonstration(rec.prompt, " Tea, perhaps.")


def test_hh_rlhf_with_different_histories_is_an_error(tmp_path):
    bad = {"chosen": HH["chosen"], "rejected": "\n\nHuman: Other\n\nAssistant: No."}
    src = write_jsonl(tmp_path / "hh.jsonl", [HH, bad])
    with pytest.raises(DataError, match=r"hh.jsonl: row 2: field 'rejected': does not share"):
        load_records(DataConfig(source=src, format="hh_rlhf"), "comparison")


def test_full_hh_rlhf_serves_all_three_stages(tmp_path):
    row = {"prompt": "\n\nHuman: Q\n\nAssistant:", "response": " A", "chosen": " A", "rejected": " B"}
    src = write_jsonl(tmp_path / "dahoas.jsonl", [row])
    cfg = DataConfig(source=src)
    assert load_records(cfg, "demonstration")[0] == [Demonstration(row["prompt"], " A")]
    assert load_records(cfg, "comparison")[0] == [Comparison(row["prompt"], " A", " B")]
    assert load_records(cfg, "prompt")[0] == [Prompt(row["prompt"])]
    assert load_records(cfg, "ranking")[0] == [Ranking(row["prompt"], (" A", " B"), (0, 1))]


def test_tldr_comparisons_from_csv(tmp_path):
    path = tmp_path / "tldr.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerow(
            {"prompt": "SUBREDDIT: r/x\nPOST: long story\nTL;DR:", "chosen": "TL;DR: short", "rejected": "TL;DR: bad"}
        )
    (rec,), _ = load_records(DataConfig(source=str(path), format="tldr"), "comparison")
    assert rec == Comparison("SUBREDDIT: r/x\nPOST: long story\nTL;DR:", " short", " bad")


def test_trl_standard_and_conversational_formats(tmp_path):
    std = write_jsonl(tmp_path / "std.jsonl", [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}])
    assert load_records(DataConfig(source=std, format="trl_standard"), "comparison")[0] == [
        Comparison("The sky is", " blue.", " green.")
    ]
    conv = tmp_path / "conv.json"
    conv.write_text(
        json.dumps(
            [
                {
                    "prompt": [{"role": "user", "content": "What color is the sky?"}],
                    "chosen": [{"role": "assistant", "content": "It is blue."}],
                    "rejected": [{"role": "assistant", "content": "It is green."}],
                }
            ]
        )
    )
    (rec,), _ = load_records(DataConfig(source=str(conv)), "comparison")
    assert rec == Comparison("\n\nHuman: What color is the sky?\n\nAssistant:", " It is blue.", " It is green.")


def test_parquet_rankings_and_column_mapping(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rank.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "x", "answers": ["a", "b", "c"], "order": [2, 0, 1]}]), path)
    cfg = DataConfig(source=str(path), columns={"prompt": "question", "responses": "answers", "ranking": "order"})
    (rec,), _ = load_records(cfg, "ranking")
    assert rec.ordered == ["c", "a", "b"]
    # A ranking also yields its best-vs-worst comparison.
    assert load_records(cfg, "comparison")[0] == [Comparison("x", "c", "b")]


@pytest.mark.parametrize(
    "row,field,message",
    [
        ({"prompt": "p", "chosen": "a"}, "rejected", "missing column 'rejected'"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt", "is empty"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "is empty"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "chosen", "expected a string"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical to chosen"),
    ],
)
def test_bad_rows_name_the_file_row_and_field(tmp_path, row, field, message):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    src = write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(DataError) as err:
        load_records(DataConfig(source=src, format="comparison"), "comparison")
    assert f"bad.jsonl: row 3: field '{field}'" in str(err.value) and message in str(err.value)


def test_bad_rows_can_be_skipped_and_counted(tmp_path):
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "", "response": "r"}, {"prompt": "p", "response": 1}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    recs, report = load_records(DataConfig(source=src, on_error="skip"), "demonstration")
    assert len(recs) == 1 and report.rows == 3 and sum(report.skipped.values()) == 2
    assert "1 of 3 rows kept" in report.summary()


def test_a_ranking_of_booleans_is_refused(tmp_path):
    """JSON's true and false are not the indices 1 and 0 that Python would take them for."""
    src = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]}])
    with pytest.raises(DataError, match=r"r.jsonl: row 1: field 'ranking': expected a permutation of 0..1"):
        load_records(DataConfig(source=src), "ranking")


def test_lines_that_are_no_row_are_skipped_and_counted_too(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "p", "resp\n[1, 2]\n\xff\n')
    recs, report = load_records(DataConfig(source=str(path), on_error="skip"), "demonstration")
    assert len(recs) == 1 and report.rows == 4
    assert set(report.skipped) == {
        "not valid JSON: Invalid control character at",
        "each line must be a JSON object",
        "not UTF-8 text (byte 0 of the line)",
    }


def test_invalid_json_and_missing_files(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"x.jsonl: row 2: not valid JSON"):
        load_records(DataConfig(source=str(path)), "demonstration")
    with pytest.raises(DataError, match="file not found"):
        load_records(DataConfig(source=str(tmp_path / "nope.jsonl")), "demonstration")


def test_split_is_20_40_40_disjoint_deterministic_and_pinned():
    n = 1000
    parts = {p: split_indices(n, p, seed=0) for p in ("sft", "reward", "rl")}
    assert [len(parts[p]) for p in ("sft", "reward", "rl")] == [200, 400, 400]
    assert sorted(parts["sft"] + parts["reward"] + parts["rl"]) == list(range(n))
    assert split_indices(n, "sft", seed=0) == parts["sft"]
    assert split_indices(n, "sft", seed=1) != parts["sft"]
    # Pinned: a change here means every existing run's split moved (sha256-based, so machine-independent).
    assert split_indices(10, "sft", seed=0) == [0, 7]


def test_split_through_load_records_does_not_depend_on_bad_rows(tmp_path):
    rows = [{"prompt": f"p{i}", "response": "r"} for i in range(50)]
    rows[7]["response"] = ""
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    recs, _ = load_records(DataConfig(source=src, on_error="skip", portion="rl"), "demonstration")
    expected = [f"p{i}" for i in split_indices(50, "rl") if i != 7]
    assert [r.prompt for r in recs] == expected


def test_holdout_is_stable_and_non_empty():
    items = list(range(20))
    train, held = holdout(items, 0.1)
    assert len(held) == 2 and sorted(train + held) == items and holdout(items, 0.1) == (train, held)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_conversations_take_the_tokenizers_chat_template_when_asked(tmp_path):
    """A conversation's prompt keeps its messages: with ``data.chat_template`` the encoder renders them with the
    tokenizer's template, opening the assistant's turn, as a chat model was tuned on, and the reply follows as
    written; without, the hh-rlhf layout. A tokenizer without a template is refused when one is asked for."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pmrlhf.config import InputError
    from pmrlhf.data.tokenize import Encoder

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the sky?"}]
    conv = write_jsonl(
        tmp_path / "conv.jsonl",
        [
            {
                "prompt": messages,
                "chosen": [{"role": "assistant", "content": "Blue."}],
                "rejected": [{"role": "assistant", "content": "Green."}],
            }
        ],
    )
    (record,), _ = load_records(DataConfig(source=conv), "comparison")
    assert record.prompt == "\n\nSystem: Be brief.\n\nHuman: What color is the sky?\n\nAssistant:"
    assert list(record.prompt.messages) == messages
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        [CHAT_TEMPLATE, str(record.prompt)],
        trainers.BpeTrainer(
            vocab_size=200, special_tokens=["<|eot_id|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|eot_id|>", pad_token="<|eot_id|>")
    with pytest.raises(InputError, match="the tokenizer has no chat template"):
        Encoder.from_data(tok, DataConfig(chat_template=True))
    tok.chat_template = CHAT_TEMPLATE
    templated = Encoder.from_data(tok, DataConfig(chat_template=True)).prompt(record.prompt)
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert templated == tok(rendered, add_special_tokens=False)["input_ids"]
    plain = Encoder.from_data(tok, DataConfig()).prompt(record.prompt)
    assert plain == tok(str(record.prompt), add_special_tokens=False)["input_ids"] != templated
    # the reply follows the template's turn as written, and the hh layout's "Assistant:" after a space
    eos = [tok.eos_token_id]
    reply = Encoder.from_data(tok, DataConfig(chat_template=True)).response(record.chosen)
    assert reply == tok("Blue.", add_special_tokens=False)["input_ids"] + eos
    assert Encoder.from_data(tok, DataConfig()).response(record.chosen) == tok(" Blue.")["input_ids"] + eos
