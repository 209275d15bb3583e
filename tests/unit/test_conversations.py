"""Conversations reach the reward: prompts keep their messages, rule functions may take `messages=`, reward
models render the whole conversation with their own chat template (as reward-model training renders its
pairs), the remote wire format carries it, and the LLM judge shows the earlier turns."""

import json
from types import SimpleNamespace

import pytest
import torch
from hf_tiny import tiny_tokenizer
from rm_tiny import hf_scores, save_hf_rm

from optune_nemo.config import ConfigError, RewardConfig
from optune_nemo.data.hf_tokenizer import HFTokenizer
from optune_nemo.data.preferences import pairs_from_rows
from optune_nemo.data.prompts import prompts_from_rows
from optune_nemo.interfaces import Prompt
from optune_nemo.reward.base import RuleReward, takes_messages

CONVERSATION = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "w30 w31"}, {"role": "user", "content": "what is 2 + 3 ?"}]


def _tokenizer():
    return HFTokenizer(tiny_tokenizer())


def _load(rows):
    return prompts_from_rows(rows, _tokenizer(), max_length=64, overlong="truncate", source="test")


# ---------------------------------------------------------------------- prompts keep their conversation

def test_prompts_keep_the_whole_conversation():
    multi, single = _load([{"messages": CONVERSATION, "answer": 5}, {"prompt": "hello", "id": 9}])
    assert multi.text == "what is 2 + 3 ?"                                  # the last user turn, as before
    assert list(multi.messages) == CONVERSATION and multi.conversation() == CONVERSATION
    assert multi.metadata == {"answer": 5}
    assert multi.token_ids == tuple(_tokenizer().apply_chat_template(CONVERSATION))
    assert single.messages == ({"role": "user", "content": "hello"},)
    assert single.conversation() == [{"role": "user", "content": "hello"}]
    # a prompt built from its text alone (an old store, a text-only request): its text is one user turn
    assert Prompt(0, "hi", ()).conversation() == [{"role": "user", "content": "hi"}]
    multi.conversation()[0]["content"] = "changed"                           # fresh dicts: the prompt keeps its own
    assert multi.messages[0]["content"] == "w20 w21"


def test_builtin_task_prompts_are_one_user_message():
    from optune_nemo.config import DataConfig
    from optune_nemo.data.prompts import load_prompts

    prompts = load_prompts(DataConfig(num_prompts=3), _tokenizer())
    assert all(p.messages == ({"role": "user", "content": p.text},) for p in prompts)


# ---------------------------------------------------------------------- rule rewards

def first_turn_reward(prompts, responses, metadata, *, messages):
    """1 when the response repeats the conversation's FIRST user turn, else 0: needs the earlier turns."""
    first = [next(m["content"] for m in conv if m["role"] == "user") for conv in messages]
    return [float(r == f) for r, f in zip(responses, first)]


def three_argument_reward(prompts, responses, metadata):
    return [float(len(p)) + metadata[i]["w"] for i, p in enumerate(prompts)]


def test_rule_function_reads_the_earlier_turns():
    with_turns = _load([{"messages": CONVERSATION}])[0]
    last_only = Prompt(0, with_turns.text, with_turns.token_ids, {}, ({"role": "user", "content": with_turns.text},))
    reward = RuleReward(first_turn_reward, name="first_turn", batch_size=4)
    assert reward.takes_messages
    assert reward.score([with_turns, last_only], ["hello world", "hello world"]) == [1.0, 0.0]


def test_three_argument_rule_function_still_works():
    reward = RuleReward(three_argument_reward, name="three", batch_size=2)
    assert not reward.takes_messages
    prompts = [Prompt(i, "p" * (i + 1), (i,), {"w": 10 * i}, tuple(CONVERSATION)) for i in range(3)]
    assert reward.score(prompts, ["a", "b", "c"]) == [1.0, 12.0, 23.0]


def test_which_functions_get_messages():
    import functools

    def kw_only(prompts, responses, metadata, *, messages, scale=1.0):
        return []

    def catch_all(prompts, responses, metadata, **kwargs):
        return []

    assert takes_messages(kw_only) and takes_messages(functools.partial(kw_only, scale=2.0))
    assert takes_messages(first_turn_reward)
    assert not takes_messages(catch_all) and not takes_messages(three_argument_reward)
    assert not takes_messages(len)                      # a builtin without an inspectable signature


def test_a_failing_messages_function_is_a_config_error():
    def broken(prompts, responses, metadata, messages):
        return [m[5]["content"] for m in messages]      # no sixth turn

    with pytest.raises(ConfigError, match="reward.function: broken raised IndexError"):
        RuleReward(broken, name="broken", batch_size=2).score(_load([{"messages": CONVERSATION}]), ["x"])


# ---------------------------------------------------------------------- reward models

def _rendered_by_transformers(rm_dir, conversation, response):
    """Plain transformers: the tokenizer's chat template with the generation prompt, the response, EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    text = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) + response
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_hf_reward_model_scores_the_whole_conversation(tmp_path):
    from optune_nemo.reward import build_reward

    rm_dir = save_hf_rm("llama_untied", tmp_path / "rm", seed=8)
    with_turns = _load([{"messages": CONVERSATION}])[0]
    last_only = Prompt(1, with_turns.text, (), {})
    response = "w7 w8 w9"
    full = _rendered_by_transformers(rm_dir, CONVERSATION, response)
    single = _rendered_by_transformers(rm_dir, [{"role": "user", "content": with_turns.text}], response)
    assert len(full) > len(single) + 6                                       # the earlier turns were kept
    want = hf_scores(rm_dir, [full, single])
    reward = build_reward(RewardConfig(type="hf", path=str(rm_dir), batch_size=2))
    reward.prepare()
    got = torch.tensor(reward.score([with_turns, last_only], [response, response]))
    reward.release()
    tol = 1e-4 if not torch.cuda.is_available() else 0.05 * max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) < tol, (got, want)
    assert abs(float(got[0] - got[1])) > 10 * tol                            # the context changes the score


def test_preference_rendering_equals_scoring_rendering():
    """train_rm renders a `messages` row exactly as a reward model renders the prompt loaded from that row."""
    from optune_nemo.reward.hf import RenderedReward

    class Renderer(RenderedReward):
        def score_sequences(self, seqs):
            return [0.0] * len(seqs)

    tok = _tokenizer()
    row = {"messages": CONVERSATION, "chosen": "w5 w6", "rejected": "w7"}
    pair, = pairs_from_rows([row], tok, max_length=256, overlong="truncate", source="test")
    prompt, = _load([{"messages": CONVERSATION}])
    renderer = Renderer(tokenizer=tok, name="r", batch_size=1, dist=None)
    assert pair.chosen == tuple(renderer.render(prompt, "w5 w6"))
    assert pair.rejected == tuple(renderer.render(prompt, "w7"))


# ---------------------------------------------------------------------- the remote wire format

def test_wire_format_carries_the_conversation():
    from optune_nemo.reward.remote import prompt_from_wire, prompt_to_wire

    prompt = _load([{"messages": CONVERSATION, "answer": 5}])[0]
    data = prompt_to_wire(prompt)
    assert json.loads(data)["messages"] == CONVERSATION
    back = prompt_from_wire(data)
    assert back == prompt and back.conversation() == CONVERSATION and back.metadata == {"answer": 5}
    # a client that sends the text only (or one written before conversations): one user turn
    old = prompt_from_wire(json.dumps({"text": "hello"}).encode())
    assert old.messages == () and old.conversation() == [{"role": "user", "content": "hello"}]
    with pytest.raises(ValueError, match="messages"):
        prompt_from_wire(json.dumps({"text": "x", "messages": [{"role": "robot", "content": "x"}]}).encode())
    with pytest.raises(ValueError, match="messages"):
        prompt_from_wire(json.dumps({"text": "x", "messages": "hello"}).encode())


# ---------------------------------------------------------------------- the LLM judge

def test_judge_shows_the_earlier_turns():
    from optune_nemo.evaluation.judge import LLMJudge, judge_messages

    question = CONVERSATION[-1]["content"]
    plain = judge_messages(question, "A1", "A2")
    assert judge_messages(question, "A1", "A2", conversation=[{"role": "user", "content": question}]) == plain
    with_turns = judge_messages(question, "A1", "A2", conversation=CONVERSATION)
    user = with_turns[-1]["content"]
    assert with_turns[0] == plain[0]
    for shown in ("System: w20 w21", "User: hello world", "Assistant: w30 w31"):
        assert shown in user
    # the earlier turns come before the question, the question once, and the rest of the request as before
    assert user.index("Assistant: w30 w31") < user.index("[User question]")
    assert user.count(question) == 1 and user.endswith(plain[-1]["content"].split("[User question]", 1)[1])

    calls = []

    def create(**kw):
        calls.append(kw)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content="7 5"))])

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    judge = LLMJudge(client, model="m", max_tokens=8, url="http://judge", key_env="K", requests_in_flight=1)
    result = judge.compare([question], ["cand"], ["base"], conversations=[CONVERSATION])
    assert result.outcomes == ("tie",)                     # 7 5 in both orders: win then lose
    assert all("User: hello world" in c["messages"][-1]["content"] for c in calls) and len(calls) == 2
    with pytest.raises(ValueError, match="conversations"):
        judge.compare([question], ["cand"], ["base"], conversations=[])
