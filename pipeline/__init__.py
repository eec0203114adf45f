"""tokenmeter: usage metering for AI model Tokens at telecom carriers."""
