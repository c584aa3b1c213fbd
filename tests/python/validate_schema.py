#!/usr/bin/env python3
"""Validate a JSON document against a JSON schema with the `jsonschema` package (an independent
implementation of JSON Schema 2020-12).   validate_schema.py SCHEMA DOCUMENT"""
import json
import sys

import jsonschema

schema = json.load(open(sys.argv[1]))
doc = json.load(open(sys.argv[2]))
jsonschema.Draft202012Validator.check_schema(schema)
jsonschema.Draft202012Validator(schema).validate(doc)
print(f"{sys.argv[2]}: valid against {sys.argv[1]}")
