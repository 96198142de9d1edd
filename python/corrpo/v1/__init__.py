"""Generated Python stubs of proto/corrpo/v1 (``make proto``); do not edit."""
