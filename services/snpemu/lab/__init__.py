"""The RMP-policy lab (docs/design.md#the-lab): scenarios x violation policies, measured."""
