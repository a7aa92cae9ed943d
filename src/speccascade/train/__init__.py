"""Training the shipped drafter / verifier pairs: tokenizer (``tokenizer``) and models (``trainer``)."""
