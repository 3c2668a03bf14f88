"""From runs to a Parameter Golf records folder: the one-file ``train_gpt.py`` (``bundle``), the
entry point it calls (``entry``) and the folder itself (``records``, ``loopgolf submission``)."""
