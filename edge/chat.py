"""Chat templates: read a checkpoint's, render it as transformers does, and hold a multi-turn chat.

The template travels with every artifact (docs/design.md §4 "Artifacts are self-sufficient"): GGUF's
`tokenizer.chat_template`, the ONNX folder's tokenizer_config.json (and the single .onnx file's
`edge.chat_template` metadata), the .pte's `edge_metadata` JSON. `Session.chat_template` is what the
artifact carries; `Chat` runs a conversation through any Session, keeping its cache between turns.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from .errors import EdgeError

# LFM2's chat template (LiquidAI's tokenizer_config.json / chat_template.jinja): ChatML with a leading
# bos, an optional system turn that also lists tools, tool results wrapped in tool-response markers.
LFM2_CHAT_TEMPLATE = (
    '{{- bos_token -}}'
    '{%- set ns = namespace(system_prompt="") -%}'
    '{%- if messages[0]["role"] == "system" -%}'
    '{%- set ns.system_prompt = messages[0]["content"] -%}'
    '{%- set messages = messages[1:] -%}'
    '{%- endif -%}'
    '{%- if tools -%}'
    '{%- set ns.system_prompt = ns.system_prompt + ("\\n" if ns.system_prompt else "") + '
    '"List of tools: <|tool_list_start|>[" -%}'
    '{%- for tool in tools -%}'
    '{%- if tool is not string -%}{%- set tool = tool | tojson -%}{%- endif -%}'
    '{%- set ns.system_prompt = ns.system_prompt + tool -%}'
    '{%- if not loop.last -%}{%- set ns.system_prompt = ns.system_prompt + ", " -%}{%- endif -%}'
    '{%- endfor -%}'
    '{%- set ns.system_prompt = ns.system_prompt + "]<|tool_list_end|>" -%}'
    '{%- endif -%}'
    '{%- if ns.system_prompt -%}'
    '{{- "<|im_start|>system\\n" + ns.system_prompt + "<|im_end|>\\n" -}}'
    '{%- endif -%}'
    '{%- for message in messages -%}'
    '{{- "<|im_start|>" + message["role"] + "\\n" -}}'
    '{%- set content = message["content"] -%}'
    '{%- if content is not string -%}{%- set content = content | tojson -%}{%- endif -%}'
    '{%- if message["role"] == "tool" -%}'
    '{%- set content = "<|tool_response_start|>" + content + "<|tool_response_end|>" -%}'
    '{%- endif -%}'
    '{{- content + "<|im_end|>\\n" -}}'
    '{%- endfor -%}'
    '{%- if add_generation_prompt -%}{{- "<|im_start|>assistant\\n" -}}{%- endif -%}'
)

TEMPLATE_FILE = "chat_template.jinja"


def read_chat_template(model_dir: str | Path) -> str | None:
    """A checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's `chat_template`
    (a string, or transformers' list of named templates, of which "default" is taken); None if absent.
    The .jinja file wins, as in transformers (it is where newer checkpoints keep the template)."""
    model_dir = Path(model_dir)
    if (model_dir / TEMPLATE_FILE).is_file():
        return (model_dir / TEMPLATE_FILE).read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except json.JSONDecodeError as e:
        raise EdgeError(f"{config} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it") from None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _compile(template: str):
    """The template compiled in transformers' environment: sandboxed, trim_blocks/lstrip_blocks,
    loop controls, its `tojson` (no ASCII escaping), `raise_exception` and `strftime_now`."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise EdgeError(f"the chat template does not compile ({e}); fix the checkpoint's chat template") from None


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
           special_tokens: dict[str, str] | None = None, tools: list | None = None) -> str:
    """The prompt text of `messages`, as transformers' `apply_chat_template(..., tokenize=False)` renders it;
    `special_tokens` gives bos_token, eos_token, pad_token as strings."""
    from jinja2.exceptions import TemplateError

    try:
        return _compile(template).render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **(special_tokens or {}))
    except TemplateError as e:
        raise EdgeError(f"the chat template failed on these messages: {e}") from None


def special_tokens(session) -> dict[str, str]:
    """bos/eos/pad token strings of a session's tokenizer (what templates call bos_token, ...)."""
    c, tok = session.config, session.tokenizer
    names = {"bos_token": c.bos_token_id, "eos_token": c.eos_token_id, "pad_token": c.pad_token_id}
    return {name: tok.id_to_token(i) or "" for name, i in names.items() if i is not None}


class Chat:
    """A multi-turn conversation through a Session with the artifact's chat template.

    The session's cache holds the conversation so far; each turn renders the whole conversation, and
    when the text already in the cache is a prefix of it (the usual case: the template appends turns),
    only the new text is tokenized and prefilled. Otherwise (a template that rewrites earlier turns)
    the session is reset and the whole prompt prefilled."""

    def __init__(self, session, template: str | None = None, system: str | None = None):
        self.session = session
        self.template = template or getattr(session, "chat_template", None)
        if not self.template:
            raise EdgeError(f"{session.path} carries no chat template; export it from a checkpoint whose "
                            "tokenizer_config.json or chat_template.jinja has one")
        session._need_tokenizer()
        self.specials = special_tokens(session)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.cached_text = ""  # the text whose tokens the session's cache holds
        self.tokens: list[int] = []  # those tokens
        self.prompt_tokens: list[int] = []  # the cache's tokens when the last reply began
        self.reply_tokens: list[int] = []  # the last reply's tokens
        self.prefilled = 0  # tokens prefilled for the last turn's prompt (less than the whole: cache kept)
        session.reset()

    def prompt(self, add_generation_prompt: bool = True) -> str:
        return render(self.template, self.messages, add_generation_prompt=add_generation_prompt,
                      special_tokens=self.specials)

    def _new_prompt_ids(self) -> list[int]:
        text = self.prompt()
        kept = self.session.n_past and self.session.n_past == len(self.tokens)  # nobody else used the session
        if kept and text.startswith(self.cached_text):
            new = text[len(self.cached_text):]
        else:
            self.session.reset()
            self.tokens, new = [], text
        self.cached_text = text
        # the template writes bos itself: no special tokens added by the tokenizer's post-processor
        ids = self.session.tokenizer.encode(new, add_special_tokens=False).ids
        self.tokens += ids
        self.prompt_tokens = list(self.tokens)
        return ids

    def send(self, content: str, role: str = "user", **generate_kwargs) -> Iterator[str]:
        """Add a message, then stream the assistant's reply (printable pieces); the reply joins the history."""
        self.messages.append({"role": role, "content": content})
        ids = self._new_prompt_ids()
        self.prefilled = len(ids)
        tok = self.session.tokenizer
        out: list[int] = []
        shown = ""
        for token in self.session.generate(ids, **generate_kwargs):
            out.append(token)
            text = tok.decode(out, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # a multi-byte character is complete
                yield text[len(shown):]
                shown = text
        reply = tok.decode(out, skip_special_tokens=True)
        # generate() feeds each token back into the cache except one it stops on (the end-of-turn token, or
        # at max_seq_len): the next turn's prompt text then starts with that token's text
        fed = out[:self.session.n_past - len(self.tokens)]
        self.cached_text += tok.decode(fed, skip_special_tokens=False)
        self.tokens += fed
        self.reply_tokens = out
        self.messages.append({"role": "assistant", "content": reply})

    def reply(self, content: str, **generate_kwargs) -> str:
        return "".join(self.send(content, **generate_kwargs))


def run_chat(session, first: str | None = None, system: str | None = None, out=None, **generate_kwargs) -> Chat:
    """`edge run --chat`: user turns from stdin (one line each; `first` is the first one), replies streamed
    to `out` (stdout); ends at end of input or on a line `/exit`."""
    import sys

    out = out or sys.stdout
    chat = Chat(session, system=system)
    turn = first
    while True:
        if turn is None:
            if sys.stdin.isatty():
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return chat
            turn = line.rstrip("\n")
        for piece in chat.send(turn, **generate_kwargs):
            print(piece, end="", file=out, flush=True)
        print(file=out, flush=True)
        turn = None
