// Starts Swagger UI on the gateway's federated OpenAPI document (/_/openapi.json).
// A file rather than an inline script, so that a Content-Security-Policy of
// "script-src 'self'" in front of the admin plane still lets the page work.
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-openapi-url"),
    domNode: root,
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    // Swagger UI would otherwise send the document to validator.swagger.io.
    validatorUrl: null,
  });
});
