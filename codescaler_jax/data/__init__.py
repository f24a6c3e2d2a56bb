"""Problems, preference pairs, tokenization with the RM chat template, Grain pipelines."""
