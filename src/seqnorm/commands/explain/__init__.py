"""``seqnorm explain``: the note's lesson, computed, printed and drawn for any input.

:mod:`.lesson` computes (from :mod:`seqnorm.reference`), :mod:`.render` prints
(text, markdown, JSON), :mod:`.figure` draws (matplotlib).
"""

from .lesson import NORMS, Group, Lesson, NormLesson, compute_lesson
from .render import lesson_dict, render_json, render_markdown, render_text

__all__ = ["NORMS", "Group", "Lesson", "NormLesson", "compute_lesson", "lesson_dict",
           "render_text", "render_markdown", "render_json"]
