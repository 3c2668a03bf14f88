"""Every model a loopgolf command can start from or score: a Hugging Face directory
(``hf``: Llama family, Gemma, GPT-2 safetensors as exact loopgolf models), a loopgolf run or
convert directory, a checkpoint, or an artifact (``load``)."""
