"""Pipeline stages, each a plain function testable without Ray."""
