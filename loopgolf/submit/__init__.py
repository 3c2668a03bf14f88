"""From runs to a Parameter Golf records folder: the entry point a generated ``train_gpt.py``
calls (``entry``; the script itself is :mod:`loopgolf.codebytes`) and the folder (``records``,
``loopgolf submission``)."""
