"""The tokenizer and MIME walker as they were before the speed work of issue 13, kept verbatim.

tests/test_spam_tokenizer_same.py checks that the faster ones in poste.spam give
exactly these tokens on generated mails (the tokens are what a database is
trained on: a changed token silently changes every score).
"""
