"""Prompt and chat templates: how a user record becomes a (prompt, response) pair.

* **Prompt template**, a ``str.format`` string with one ``{prompt}`` field,
  applied to the prompt of ``{"prompt", "response"}`` records:
  ``"### Question\\n{prompt}\\n### Answer\\n"``.  The default ``"{prompt}"``
  leaves prompts as they are.
* **Chat template**, a Jinja template in the convention of transformers'
  ``apply_chat_template``: it sees ``messages`` (``[{"role", "content"}]``),
  ``add_generation_prompt``, ``bos_token`` and ``eos_token``.  The template of
  the tokenizer (``tokenizer_config.json``'s ``chat_template``) is used when
  there is one; otherwise ``DEFAULT_CHAT_TEMPLATE``::

      <|system|>
      You are helpful.
      <|user|>
      Hi
      <|assistant|>
      Hello!

  (one ``<|role|>`` line, then the content, per message; the generation
  prompt is ``<|assistant|>\\n``).  With the byte tokenizer these markers are
  plain text.

A conversation trains on its **last** assistant message: the prompt is the
rendering of the messages before it with the generation prompt, the response
is what the full rendering adds after that.  A template for which the full
rendering does not start with that prompt is an error (loss masks would be
misplaced).  The EOS the packer appends ends the response.
"""

from __future__ import annotations

import functools

DEFAULT_CHAT_TEMPLATE = (  # newlines as expressions: HF renders with trim_blocks
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """A template that cannot be applied; the message names it."""


def check_prompt_template(template: str) -> None:
    try:
        out = template.format(prompt="\x00")
    except (KeyError, IndexError, ValueError) as e:
        raise TemplateError(f"prompt_template {template!r}: a str.format string with only a {{prompt}} field "
                            f"({type(e).__name__}: {e})") from None
    if "\x00" not in out:
        raise TemplateError(f"prompt_template {template!r} has no {{prompt}} field")


def apply_prompt(template: str, prompt: str) -> str:
    return template.format(prompt=prompt)


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):  # the helper HF templates call
        raise TemplateError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template: {e.message} (line {e.lineno})") from None


class ChatTemplate:
    """A Jinja chat template with the tokenizer's BOS/EOS strings."""

    def __init__(self, template: str | None = None, *, bos_token: str = "", eos_token: str = ""):
        self.source = template or DEFAULT_CHAT_TEMPLATE
        self._tpl = _compiled(self.source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._tpl.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.UndefinedError as e:
            raise TemplateError(f"chat template: {e.message}") from None

    def split(self, messages) -> tuple[str, str]:
        """``(prompt, response)``: the last message must be the assistant's."""
        if not messages or messages[-1].get("role") != "assistant":
            raise TemplateError("a conversation must end with an assistant message")
        prompt = self.render(messages[:-1], add_generation_prompt=True)
        full = self.render(messages)
        if not full.startswith(prompt):
            raise TemplateError("chat template: the full conversation does not start with the rendering of its "
                                "prompt (messages before the last, with the generation prompt); cannot place the loss")
        response = full[len(prompt):]
        if self.eos_token and response.endswith(self.eos_token):  # the packer appends EOS itself
            response = response[: -len(self.eos_token)]
        return prompt, response
