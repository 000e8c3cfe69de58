"""Next-token predictors: the language model's distribution and the online ensemble on top."""
