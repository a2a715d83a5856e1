"""The confirmation-page snippet: its readable JavaScript source (``kassa.js``) and the build that serves it
(``kassa.snippet.build``)."""
