"""Folders; the tests point them at a temporary directory."""

models_path = "models"
script_path = "."
data_path = "."
