"""Settings and errors: the bottom layer, importing nothing else of the package.

``settings`` reads and validates every environment variable once; ``errors`` holds the
exceptions whose one-line messages reach the user.
"""
