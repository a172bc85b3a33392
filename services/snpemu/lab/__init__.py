"""The RMP-policy lab (DESIGN.md section 2): scenarios x violation policies, measured."""
