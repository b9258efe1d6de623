"""The report's typed records, their text and JSON renderings, and the optional plot."""
