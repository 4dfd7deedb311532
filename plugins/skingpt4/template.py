"""SkinGPT-4's conversation format (MiniGPT-4 ``CONV_VISION`` with ``###`` separators).

    <system>###Human: <Img><ImageHere></Img> What's wrong with my skin?###Assistant:

Follow-up turns append ``###Assistant: <answer>###Human: <question>``; images stay in context.
The answer is stripped, as SkinGPT-4 stores it; then the re-sent answer tokenizes as it was
generated (``:`` + `` The``), so prefix caching covers the whole history, not just turn 1.
The Jinja template below renders exactly this from OpenAI chat messages. It loops over the
content parts, so vLLM hands it the ``openai`` content format and the template, not vLLM, puts
each image where the user put it. Literal text keeps its spaces (``'###Human: '``).

The template is the one source of the prompt: vLLM renders it (through the model folder's
tokenizer), and :func:`render_chat` / :func:`build_prompt` render it here the way transformers
does, without the BOS, for the reference pipeline, the Hugging Face baselines and the tests.
"""

from __future__ import annotations

from functools import lru_cache

DEFAULT_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once "
    "I provide it to you. Please answer my questions."
)
SEP = "###"
ROLES = {"user": "Human", "assistant": "Assistant"}
IMAGE_SEGMENT = "<Img><ImageHere></Img>"
DEFAULT_QUESTION = "What's wrong with my skin?"

# The paper's consult protocol (Fig. 2 of the SkinGPT-4 paper): one photo, four questions.
CONSULT_QUESTIONS = (
    "Could you describe the skin condition in this image for me?",
    "Please provide a paragraph listing additional features you observed in the image.",
    "Based on the image, what are the possible causes of this skin condition?",
    "Could you suggest some treatments for this skin condition?",
)

CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='" + DEFAULT_SYSTEM + "') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set ns.system = message['content'] -%}"
    "{%- else -%}{%- set ns.system = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.system -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '###Human: ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '###Assistant: ' -}}{%- endif -%}"
    "{%- if message['role'] in ['user', 'assistant'] -%}"
    "{%- if message['content'] is string and message['role'] == 'assistant' -%}"
    "{{- message['content'] | trim -}}"
    "{%- elif message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if not loop.first -%}{{- ' ' -}}{%- endif -%}"
    "{%- if content['type'] in ['image', 'image_url'] -%}{{- '" + IMAGE_SEGMENT + "' -}}"
    "{%- elif content['type'] == 'text' and message['role'] == 'assistant' -%}"
    "{{- content['text'] | trim -}}"
    "{%- elif content['type'] == 'text' -%}{{- content['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '###Assistant:' -}}{%- endif -%}"
)


@lru_cache(maxsize=1)
def _compiled_template():
    # jinja2 is imported here so that importing the constants above stays free. The environment is
    # the one transformers renders chat templates in (``chat_template_utils._compile_jinja_template``).
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """``CHAT_TEMPLATE`` over OpenAI-style chat messages (``{"role", "content"}``, content a string
    or a list of ``text`` / ``image_url`` parts), without the BOS: what
    ``tokenizer.apply_chat_template(messages, tokenize=False)`` returns minus ``bos_token``."""
    return _compiled_template().render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=""
    )


def build_prompt(turns: list[tuple[str, str]], system: str = DEFAULT_SYSTEM) -> str:
    """Render (role, text) turns the way SkinGPT-4's ``Conversation.get_prompt`` does.

    ``role`` is ``user`` or ``assistant``; user text carries ``<Img><ImageHere></Img>`` where an
    image goes; answers are stripped. Ends with ``###Assistant:`` so the model answers next.
    A thin front of :func:`render_chat`: the turns become string-content messages.
    """
    messages = [{"role": "system", "content": system}]
    for role, text in turns:
        if role not in ROLES:
            raise ValueError(f"turn role is {role!r}; it must be one of {sorted(ROLES)}")
        messages.append({"role": role, "content": text})
    return render_chat(messages, add_generation_prompt=True)


def image_question(question: str = DEFAULT_QUESTION, num_images: int = 1) -> str:
    """User text of a first turn: the image segments, then the question (MiniGPT-4 ``ask``)."""
    return " ".join([IMAGE_SEGMENT] * num_images + [question])
