"""The four DuDoCLIP prompts P1-P4 in the paper's "Qualifier + Instruction" pattern (§III-B "Prompt
Engineering", Fig. 5) and the LLaVA-1.5 prompt format, defined once.

========  =======  ==========  ===========================================  ==================================
prompt    answer   domain      shown to the captioner                       asks for
========  =======  ==========  ===========================================  ==================================
P1        A1       image       clean slice X_ref (X_ma when no reference)    content: anatomy
P2        A2       image       residual X_r = X_ma - X_ref (or X_ma)         QSPD tuple of the metal
P3        A3       sinogram    clean sinogram Y_ref (Y_ma when no ref.)      content: what the sinogram shows
P4        A4       sinogram    residual Y_r = Y_ma - Y_ref (or Y_ma)         QSPD tuple of the metal trace
========  =======  ==========  ===========================================  ==================================

The paper prints the prompts only as a figure (Fig. 5), so the wording here is ours; the structure is the
paper's. The *qualifier* states the facts a reader needs to answer correctly (modality, display window,
radiological orientation — the patient's right is on the image left —, pixel size, detector layout); the
*instruction* states the task and the answer form. Each prompt also renders without its qualifier, the
ablation of Fig. 6(a). Which image a content prompt is shown is a choice: §III-B describes "clean image" content,
Algorithm 1 step 2 writes ``X_ma -> T_1``; we caption the clean X_ref where it exists (see
``dudocrop.captions.captioning``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

#: LLaVA-1.5's single-turn prompt (REFERENCE §5); the one place it is written.
IMAGE_TOKEN = "<image>"
LLAVA_PROMPT_FORMAT = "USER: " + IMAGE_TOKEN + "\n{instruction} ASSISTANT:"

Domain = Literal["image", "sinogram"]
Kind = Literal["content", "tuple"]

#: What each view name means, in the words a qualifier uses.
VIEW_PHRASES = {
    "X_ref": "an axial CT slice without metal",
    "X_ma": "a metal-affected axial CT slice",
    "X_r": "the residual X_r = X_ma - X_ref of an axial CT slice (metal-affected minus metal-free)",
    "Y_ref": "the sinogram of an axial CT slice without metal",
    "Y_ma": "the sinogram of a metal-affected axial CT slice",
    "Y_r": "the residual Y_r = Y_ma - Y_ref of a CT sinogram (metal-affected minus metal-free)",
}


def llava_prompt(text: str) -> str:
    """``text`` in the LLaVA-1.5 format ``USER: <image>\\n{text} ASSISTANT:`` (one image per prompt)."""
    if IMAGE_TOKEN in text:
        raise ValueError(f"prompt text must not contain {IMAGE_TOKEN!r} itself (the format adds exactly one)")
    return LLAVA_PROMPT_FORMAT.format(instruction=text.strip())


def instruction_of(llava_text: str) -> str:
    """The text inside a LLaVA-1.5 prompt (inverse of :func:`llava_prompt`); raises if not in that format."""
    head, tail = "USER: " + IMAGE_TOKEN + "\n", " ASSISTANT:"
    if not (llava_text.startswith(head) and llava_text.endswith(tail)) or llava_text.count(IMAGE_TOKEN) != 1:
        raise ValueError(f"not a LLaVA-1.5 prompt {LLAVA_PROMPT_FORMAT!r}: {llava_text[:80]!r}")
    return llava_text[len(head): -len(tail)]


@dataclass(frozen=True)
class PromptFacts:
    """Per-slice facts a qualifier states (placeholders ``{anatomy}``, ``{window}``, ...)."""

    view: str  # a key of VIEW_PHRASES
    anatomy: str  # 'body' | 'head' (schema metadata)
    window: str  # the display window, e.g. '[-175, 275] HU'
    pixel_mm: float
    n_views: int
    n_channels: int
    channel_mm: float  # channel pitch at the isocentre

    def as_format_dict(self) -> dict:
        if self.view not in VIEW_PHRASES:
            raise ValueError(f"PromptFacts.view must be one of {sorted(VIEW_PHRASES)}, got {self.view!r}")
        return {"view_phrase": VIEW_PHRASES[self.view], "anatomy": self.anatomy, "window": self.window,
                "pixel_mm": f"{self.pixel_mm:.3g}", "n_views": self.n_views, "n_channels": self.n_channels,
                "channel_mm": f"{self.channel_mm:.3g}"}


@dataclass(frozen=True)
class Prompt:
    """A "Qualifier + Instruction" prompt (Fig. 5). Subclasses fix key, answer, domain, kind and the views
    they may be shown; the texts are fields so an experiment can override them without new code."""

    key: ClassVar[str]
    answer: ClassVar[str]
    domain: ClassVar[Domain]
    kind: ClassVar[Kind]
    views: ClassVar[tuple[str, ...]]
    qualifier: str = ""
    instruction: str = ""

    def text(self, facts: PromptFacts, qualified: bool = True) -> str:
        """Qualifier + instruction (or the instruction alone: the no-qualifier ablation, Fig. 6(a))."""
        if facts.view not in self.views:
            raise ValueError(f"{self.key} is shown one of {self.views}, got view {facts.view!r}")
        inst = self.instruction.format(**facts.as_format_dict())
        if not qualified:
            return inst
        return self.qualifier.format(**facts.as_format_dict()) + " " + inst

    def llava(self, facts: PromptFacts, qualified: bool = True) -> str:
        """The full LLaVA-1.5 prompt string for this slice."""
        return llava_prompt(self.text(facts, qualified))


_RADIOLOGIST = "You are an experienced radiologist."
_ORIENTATION = ("The patient lies supine: the patient's right is on the image left, the patient's left on the "
                "image right, anterior at the top.")


@dataclass(frozen=True)
class P1ImageContent(Prompt):
    """P1 -> A1: content description of the clean CT slice (organs, tissues, location; §III-B)."""

    key: ClassVar[str] = "P1"
    answer: ClassVar[str] = "A1"
    domain: ClassVar[Domain] = "image"
    kind: ClassVar[Kind] = "content"
    views: ClassVar[tuple[str, ...]] = ("X_ref", "X_ma")
    qualifier: str = (_RADIOLOGIST + " This is {view_phrase} of the {anatomy}, shown in a soft-tissue window "
                      "{window}; pixels are {pixel_mm} mm. " + _ORIENTATION)
    instruction: str = ("Describe the anatomy in two short sentences: the body region, the organs, bone, lungs, "
                        "fat and soft tissue you see and where they are.")


@dataclass(frozen=True)
class P2ImageTuple(Prompt):
    """P2 -> A2: the QSPD tuple of the metal and its artifacts in the image residual X_r (§III-B, Fig. 6(b))."""

    key: ClassVar[str] = "P2"
    answer: ClassVar[str] = "A2"
    domain: ClassVar[Domain] = "image"
    kind: ClassVar[Kind] = "tuple"
    views: ClassVar[tuple[str, ...]] = ("X_r", "X_ma")
    qualifier: str = (_RADIOLOGIST + " This is {view_phrase} of the {anatomy}, window {window}; pixels are "
                      "{pixel_mm} mm. Metal implants are the brightest spots; streak artifacts are bright and "
                      "dark lines. " + _ORIENTATION)
    instruction: str = ("Answer in one line: quantity: <number of metal implants>; size: <diameter in mm of "
                        "each>; position: <side, anterior or posterior, nearby bone>; description: <severity and "
                        "direction of the streak artifacts>.")


@dataclass(frozen=True)
class P3SinogramContent(Prompt):
    """P3 -> A3: content description of the clean sinogram (§III-B)."""

    key: ClassVar[str] = "P3"
    answer: ClassVar[str] = "A3"
    domain: ClassVar[Domain] = "sinogram"
    kind: ClassVar[Kind] = "content"
    views: ClassVar[tuple[str, ...]] = ("Y_ref", "Y_ma")
    qualifier: str = ("You are a CT physicist. This is {view_phrase} of the {anatomy}: {n_views} projection "
                      "views from top to bottom, {n_channels} detector channels ({channel_mm} mm at the "
                      "isocentre) from left to right, line integrals in the window {window}.")
    instruction: str = ("Describe the sinogram in two short sentences: which channels and what fraction of the "
                        "detector the body covers, and which structures make the bright sinusoidal tracks.")


@dataclass(frozen=True)
class P4SinogramTuple(Prompt):
    """P4 -> A4: the QSPD tuple of the metal trace in the sinogram residual Y_r (§III-B)."""

    key: ClassVar[str] = "P4"
    answer: ClassVar[str] = "A4"
    domain: ClassVar[Domain] = "sinogram"
    kind: ClassVar[Kind] = "tuple"
    views: ClassVar[tuple[str, ...]] = ("Y_r", "Y_ma")
    qualifier: str = ("You are a CT physicist. This is {view_phrase} of the {anatomy}: {n_views} projection "
                      "views from top to bottom, {n_channels} detector channels ({channel_mm} mm at the "
                      "isocentre) from left to right, window {window}. Metal appears as bright sinusoidal traces.")
    instruction: str = ("Answer in one line: quantity: <number of metal traces>; size: <trace width in mm>; "
                        "position: <views and channels the traces cover, fraction of the detector>; "
                        "description: <appearance of the traces>.")


PROMPTS: dict[str, Prompt] = {p.key: p for p in (P1ImageContent(), P2ImageTuple(), P3SinogramContent(),
                                                  P4SinogramTuple())}


def get_prompt(key: str) -> Prompt:
    """``'P1'`` ... ``'P4'``."""
    try:
        return PROMPTS[key]
    except KeyError:
        raise ValueError(f"unknown prompt {key!r}; prompts: {', '.join(PROMPTS)}") from None


def prompt_texts() -> dict[str, dict[str, str]]:
    """The prompt templates (for the captions manifest, so a run records exactly what it asked)."""
    return {k: {"answer": p.answer, "qualifier": p.qualifier, "instruction": p.instruction,
                "format": LLAVA_PROMPT_FORMAT} for k, p in PROMPTS.items()}
