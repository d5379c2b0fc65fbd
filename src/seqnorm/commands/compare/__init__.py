"""``seqnorm compare``: train the note's Transformer with every norm and compare.

:mod:`.tasks` holds the embedded data, :mod:`.compute` trains and measures
(independent runs in parallel worker processes), :mod:`.report` writes the
table, CSV and figures, :mod:`.command` is the CLI. ``--tasks speech`` trains
CTC speech models on espeak-ng digits instead: :mod:`.speech_data` →
:mod:`.speech_train` → :mod:`.speech_report` → :mod:`.speech_command`.
"""
