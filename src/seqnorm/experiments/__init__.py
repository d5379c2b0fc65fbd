"""``seqnorm compare``: train the note's Transformer with every norm and compare."""
