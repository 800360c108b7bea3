"""The rest of the standard suite (HellaSwag, Winogrande, TruthfulQA, PIQA, BoolQ), lm-eval 0.4 exactly."""
